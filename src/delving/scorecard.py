"""The reproduction scorecard: one row per claim of the paper, with a verdict decided by a rule.

Each chapter records its measured numbers with `results.record_findings(chapter, ...)`; this
module reads the newest findings of every chapter and applies one stated rule per claim. The
paper's figures are quoted from PAPER.md; ours come only from the findings (and through them
from the run records they name). Verdicts: "reproduced", "partly", "not reproduced",
"not run at this scale" (no findings, or the chapter did not run that experiment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from delving import results
from delving.prelu import difference, spread_class

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_RUN = "reproduced", "partly", "not reproduced", "not run at this scale"


@dataclass(frozen=True)
class Thresholds:
    """The numbers the rules use; shown on the scorecard page beside the rules."""

    variance_factor: float = 2.0  # measured/predicted variance within this factor counts as "on the line"
    stalled_top1: float = 0.85    # top-1 error at or above this (10 classes: chance 0.90) = still at chance
    gradient_ratio: float = 10.0  # He/Xavier first-layer gradient norm above this: Xavier's gradients vanish
    margin_points: float = 0.5    # top-1 differences (points) smaller than this are "no clear difference"
    z: float = 2.0                # a difference counts when it exceeds z standard errors over seeds
    coefficient_gap: float = 0.05  # conv1's PReLU coefficient must exceed the conv3 stage's mean by this much


@dataclass(frozen=True)
class Verdict:
    verdict: str
    ours: str
    spread: str = ""


@dataclass(frozen=True)
class Claim:
    key: str
    claim: str
    paper: str
    chapter: str
    rule: str
    judge: Callable[[dict[str, Any], Thresholds], Verdict]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


# --- rules, one per claim ---------------------------------------------------------------------

def _variance_preserved(f, t):
    # Eqs. 7-15 are statements about expectations over the weights, so the estimator is the
    # pooled ratio (mean variance over draws, divided); per-draw ratios are roughly log-normal
    # in deep narrow nets, so their median sits below the mean and is shown as the spread.
    he_in, he_out = f["schemes"].get("he-fan-in", {}), f["schemes"].get("he-fan-out", {})
    fwd = he_in.get("forward_last_ratio_pooled", he_in.get("forward_last_ratio_median"))
    bwd = he_out.get("backward_first_ratio_pooled", he_out.get("backward_first_ratio_median"))
    if fwd is None or bwd is None:
        return Verdict(NOT_RUN, "he-fan-in / he-fan-out not among the schemes run")
    ok = [1 / t.variance_factor <= r <= t.variance_factor for r in (fwd, bwd)]
    verdict = REPRODUCED if all(ok) else PARTLY if any(ok) else NOT_REPRODUCED
    return Verdict(verdict, f"measured/predicted (mean over draws) at layer {f['depth']}: forward (Eq. 10) "
                            f"{_fmt(fwd)}, backward (Eq. 14) {_fmt(bwd)}",
                   f"per-draw median {_fmt(he_in.get('forward_last_ratio_median'))} [IQR "
                   f"{he_in.get('forward_last_ratio_iqr')}] forward, {_fmt(he_out.get('backward_first_ratio_median'))} "
                   f"[IQR {he_out.get('backward_first_ratio_iqr')}] backward")


def _xavier_factor(f, t):
    x = f.get("xavier_factor")
    if not x:
        return Verdict(NOT_RUN, "Xavier and He not both run")
    ratio = x["measured"] / x["predicted"]
    verdict = REPRODUCED if 1 / t.variance_factor <= ratio <= t.variance_factor else NOT_REPRODUCED
    return Verdict(verdict, f"Var ratio Xavier/He after {x['layers']} layers: measured {_fmt(x['measured'])}, "
                            f"predicted 2^-{x['layers']} = {_fmt(x['predicted'])}")


def _fixed_std(f, t):
    p = f["paper_numbers"]
    ratio = p["fixed_std_gradient_ratio"]
    verdict = REPRODUCED if abs(ratio / 1.7e4 - 1) < 0.05 else NOT_REPRODUCED
    return Verdict(verdict, f"Eq. 14 stds {', '.join(_fmt(s, 2) for s in p['vgg_stds'])}; ratio 1/({ratio:.3g})")


def _converges(run: dict[str, Any], t: Thresholds) -> bool:
    return run.get("status") == "completed" and run["final_top1"] < t.stalled_top1


def _fig2(f, t):
    m = f.get("models", {}).get("model_b")
    if not m:
        return Verdict(NOT_RUN, "the 22-layer model was not run")
    he, xa = m["he"], m["xavier"]
    both = _converges(he, t) and _converges(xa, t)
    earlier = (he.get("left_chance_epoch") is not None
               and (xa.get("left_chance_epoch") is None or he["left_chance_epoch"] < xa["left_chance_epoch"]))
    verdict = REPRODUCED if both and earlier else PARTLY if both or earlier else NOT_REPRODUCED
    return Verdict(verdict, f"final top-1 error He {_fmt(he['final_top1'])}, Xavier {_fmt(xa['final_top1'])}; "
                            f"left chance at epoch He {_fmt(he.get('left_chance_epoch'))}, "
                            f"Xavier {_fmt(xa.get('left_chance_epoch'))}")


def _fig3(f, t):
    m = f.get("models", {}).get("deep30")
    if not m:
        return Verdict(NOT_RUN, "the 30-layer model was not run")
    he, xa = m["he"], m["xavier"]
    grad = f.get("grad_ratio_first_layer", {}).get("deep30")
    parts = [_converges(he, t), not _converges(xa, t), grad is not None and grad > t.gradient_ratio]
    verdict = REPRODUCED if all(parts) else PARTLY if any(parts) else NOT_REPRODUCED
    return Verdict(verdict, f"final top-1 error He {_fmt(he['final_top1'])} ({he['status']}), Xavier "
                            f"{_fmt(xa['final_top1'])} ({xa['status']}); first-layer gradient norm He/Xavier {_fmt(grad)}")


def _deeper_worse(f, t):
    m = f.get("models", {})
    if "deep30" not in m or "small14" not in m:
        return Verdict(NOT_RUN, "the 14- and 30-layer models were not both run with He init")
    d30, d14 = m["deep30"]["he"]["final_top1"], m["small14"]["he"]["final_top1"]
    diff = 100 * (d30 - d14)
    verdict = REPRODUCED if diff > t.margin_points else NOT_REPRODUCED
    return Verdict(verdict, f"top-1 error 30-layer {_pct(d30)} vs 14-layer {_pct(d14)} (difference {diff:+.2f} points)")


def _table2(f, t):
    a = f.get("activations", {})
    if "relu" not in a or "prelu-channel-wise" not in a:
        return Verdict(NOT_RUN, "ReLU and channel-wise PReLU not both run")
    diff, se = difference(a["relu"], a["prelu-channel-wise"])
    clear = diff > 0 and spread_class(diff, se, t.margin_points, t.z) == "beyond"
    verdict = REPRODUCED if clear else PARTLY if diff > 0 else NOT_REPRODUCED
    return Verdict(verdict, f"top-1 error ReLU {_pct(a['relu']['top1_mean'])}, PReLU channel-wise "
                            f"{_pct(a['prelu-channel-wise']['top1_mean'])}: PReLU better by {diff:+.2f} points",
                   f"standard error of the difference {se:.2f} points over {a['relu']['n_seeds']} seeds")


def _equal(diff: float, se: float, t: Thresholds) -> str:
    """An "about as good" claim: reproduced when the measured difference is within the margin;
    partly when it is larger but not beyond z standard errors (the seeds disagree too much to
    tell equal from different: no evidence either way is not evidence of equality); not
    reproduced when it is beyond both."""
    return {"within margin": REPRODUCED, "within spread": PARTLY,
            "beyond": NOT_REPRODUCED}[spread_class(diff, se, t.margin_points, t.z)]


def _shared_vs_wise(f, t):
    a = f.get("activations", {})
    if "prelu-shared" not in a or "prelu-channel-wise" not in a:
        return Verdict(NOT_RUN, "both PReLU variants not run")
    diff, se = difference(a["prelu-shared"], a["prelu-channel-wise"])
    return Verdict(_equal(diff, se, t), f"top-1 error shared {_pct(a['prelu-shared']['top1_mean'])}, channel-wise "
                                        f"{_pct(a['prelu-channel-wise']['top1_mean'])} (difference {diff:+.2f} points)",
                   f"standard error {se:.2f} points")


def _coefficients(f, t):
    c = f.get("coefficients", {}).get("prelu-channel-wise")
    if not c:
        return Verdict(NOT_RUN, "no channel-wise PReLU run")
    convs = {k: v for k, v in c.items() if k.startswith("conv")}
    first_largest = max(convs, key=convs.get) == "conv1"
    stage3 = [v for k, v in convs.items() if k.startswith("conv3")]
    # a gap smaller than coefficient_gap is no pattern: coefficients that have hardly left their
    # common initial 0.25 would otherwise "order" themselves by noise
    deeper_smaller = bool(stage3) and convs["conv1"] - sum(stage3) / len(stage3) >= t.coefficient_gap
    verdict = REPRODUCED if first_largest and deeper_smaller else PARTLY if deeper_smaller else NOT_REPRODUCED
    return Verdict(verdict, f"conv1 {_fmt(convs.get('conv1'))}, largest conv layer {max(convs, key=convs.get)}, "
                            f"conv3x mean {_fmt(sum(stage3) / len(stage3) if stage3 else None)}")


def _he_vs_xavier_14(f, t):
    a = f.get("activations", {})
    x = f.get("xavier_relu")
    if not x or "relu" not in a:
        return Verdict(NOT_RUN, "the 14-layer model was not run with Xavier init")
    diff, se = difference(x, a["relu"])
    return Verdict(_equal(diff, se, t), f"top-1 error Xavier {_pct(x['top1_mean'])}, He {_pct(a['relu']['top1_mean'])} "
                            f"(difference {diff:+.2f} points)", f"standard error {se:.2f} points")


def _imagenet_only(f, t):
    return Verdict(NOT_RUN, "needs ImageNet and GPU weeks (profile gpu-imagenet)")


CLAIMS: tuple[Claim, ...] = (
    Claim("eq10-14", "He initialisation (Eq. 10 forward, Eq. 14 backward) preserves the variance at every depth",
          "ratio 1 at every layer", "01_variance",
          "reproduced if the measured/predicted variance ratio at the last layer (variances averaged over weight "
          "draws, as the equations' expectations are) is within the variance factor for both Eq. 10 (forward) and "
          "Eq. 14 (backward); partly if one", _variance_preserved),
    Claim("xavier-factor", "Xavier's signal shrinks by 1/sqrt(2) per ReLU layer (std 1/sqrt(2)^L of He's)",
          "1/sqrt(2)^L", "01_variance",
          "reproduced if measured Var ratio Xavier/He after L layers is within the variance factor of 2^-L",
          _xavier_factor),
    Claim("fixed-std", "std 0.01 on VGG model B: gradient conv10 to conv2 is 1/(1.7e4) of the derived scale",
          "1/(1.7 x 10^4)", "01_variance", "reproduced if recomputed from Eq. 14 within 5 %", _fixed_std),
    Claim("fig2", "22 layers (model B): both inits converge, He starts reducing error earlier",
          "He 0.788, Xavier 0.855 top-1 at epoch 3 (approx.)", "02_convergence",
          "reproduced if both end below the stalled error and He leaves chance first; partly if one of the two",
          _fig2),
    Claim("fig3", "30 layers: He converges, Xavier stalls, its gradients diminishing",
          "He about 0.795, Xavier 0.999 top-1", "02_convergence",
          "reproduced if He ends below the stalled error, Xavier at or above it, and He/Xavier first-layer "
          "gradient norm exceeds the gradient ratio; partly if one or two of the three", _fig3),
    Claim("deeper-worse", "the 30-layer model is worse than the 14-layer one", "38.56 vs 33.82 top-1 (%)",
          "02_convergence", "reproduced if the 30-layer He run's top-1 error exceeds the 14-layer one's by more "
          "than the margin", _deeper_worse),
    Claim("table2", "PReLU beats ReLU on the 14-layer model", "ReLU 33.82, PReLU 32.64 top-1 (%): 1.2 points",
          "03_prelu", "reproduced if channel-wise PReLU's top-1 error is lower by more than the margin and z "
          "standard errors; partly if lower at all", _table2),
    Claim("shared-vs-wise", "channel-shared PReLU is about as good as channel-wise",
          "32.71 vs 32.64 top-1 (%)", "03_prelu",
          "reproduced if the difference is within the margin; partly if larger but within z standard errors "
          "(too noisy to tell); not reproduced if beyond both", _shared_vs_wise),
    Claim("table1", "learned coefficients: conv1 largest, deeper conv layers smaller (channel-wise)",
          "conv1 0.596; conv3x 0.12-0.20", "03_prelu",
          "reproduced if conv1's mean coefficient is the largest conv layer's and the conv3 stage's mean is "
          "below it by at least the coefficient gap; partly if only the latter", _coefficients),
    Claim("he-xavier-14", "on the 14-layer model He and Xavier reach the same accuracy",
          "33.90 (Xavier) vs 33.82 (He) top-1 (%)", "03_prelu",
          "reproduced if the difference is within the margin; partly if larger but within z standard errors "
          "(too noisy to tell); not reproduced if beyond both", _he_vs_xavier_14),
    Claim("table5-7", "ImageNet: model C with PReLU 24.27/7.38 (10-view), 4.94 % top-5 ensemble",
          "4.94 % top-5 (test)", "03_prelu", "needs the full ImageNet setting", _imagenet_only),
)


def scorecard(thresholds: Thresholds = Thresholds(), findings: dict[str, dict | None] | None = None) -> pd.DataFrame:
    """The scorecard as a table. `findings` maps chapter -> findings dict (default: newest records)."""
    if findings is None:
        findings = {}
        for chapter in {c.chapter for c in CLAIMS}:
            record = results.latest_findings(chapter)
            findings[chapter] = None if record is None else {**record.summary["findings"], "_record": record}
    rows = []
    for c in CLAIMS:
        f = findings.get(c.chapter)
        v = Verdict(NOT_RUN, "chapter not run") if not f else c.judge(f, thresholds)
        record = (f or {}).get("_record")
        rows.append({"claim": c.claim, "paper": c.paper, "ours": v.ours, "spread": v.spread,
                     "scale": (f or {}).get("scale", ""), "verdict": v.verdict, "rule": c.rule,
                     "chapter": c.chapter, "run": record.run_id if record else ""})
    return pd.DataFrame(rows)
