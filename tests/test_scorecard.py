"""Scorecard rules on hand-made findings (the schema each chapter's findings follow)."""

import pytest

from delving import results
from delving.scorecard import CLAIMS, NOT_REPRODUCED, NOT_RUN, PARTLY, REPRODUCED, Thresholds, scorecard

VARIANCE = {
    "depth": 30, "scale": "conv stack width 64",
    "schemes": {"he-fan-in": {"forward_last_ratio_median": 0.93, "forward_last_ratio_iqr": [0.8, 1.1]},
                "he-fan-out": {"backward_first_ratio_median": 1.05, "backward_first_ratio_iqr": [0.9, 1.2]}},
    "xavier_factor": {"layers": 29, "measured": 2.0 ** -29 * 1.2, "predicted": 2.0 ** -29},
    "paper_numbers": {"vgg_stds": [0.059, 0.042, 0.029, 0.021], "fixed_std_gradient_ratio": 1.69e4},
}
CONVERGENCE = {
    "scale": "Fashion-MNIST",
    "models": {"deep30": {"he": {"final_top1": 0.3, "status": "completed", "left_chance_epoch": 0.5},
                          "xavier": {"final_top1": 0.9, "status": "completed", "left_chance_epoch": None}},
               "model_b": {"he": {"final_top1": 0.2, "status": "completed", "left_chance_epoch": 0.25},
                           "xavier": {"final_top1": 0.25, "status": "completed", "left_chance_epoch": 0.5}},
               "small14": {"he": {"final_top1": 0.15, "status": "completed", "left_chance_epoch": 0.25}}},
    "grad_ratio_first_layer": {"deep30": 1e4, "model_b": 30.0},
}


def _acts(relu, shared, wise, std=0.003, n=3):
    mk = lambda m: {"top1_mean": m, "top1_std": std, "top5_mean": m / 3, "top5_std": std, "n_seeds": n}
    return {"relu": mk(relu), "prelu-shared": mk(shared), "prelu-channel-wise": mk(wise)}


PRELU = {
    "scale": "Fashion-MNIST", "activations": _acts(0.12, 0.105, 0.104),
    "coefficients": {"prelu-channel-wise": {"conv1": 0.6, "conv21": 0.3, "conv31": 0.1, "conv32": 0.15, "fc1": 0.07}},
    "xavier_relu": {"top1_mean": 0.121, "top1_std": 0.003, "n_seeds": 3},
}


def _verdicts(**findings):
    table = scorecard(Thresholds(), {"01_variance": VARIANCE, "02_convergence": CONVERGENCE, "03_prelu": PRELU,
                                     **findings})
    return dict(zip([c.key for c in CLAIMS], table["verdict"]))


def test_all_claims_reproduced_on_agreeing_findings():
    v = _verdicts()
    assert all(v[k] == REPRODUCED for k in v if k != "table5-7"), v
    assert v["table5-7"] == NOT_RUN


def test_rules_turn_on_the_numbers():
    stalled_he = {**CONVERGENCE, "models": {**CONVERGENCE["models"],
                  "deep30": {**CONVERGENCE["models"]["deep30"],
                             "he": {"final_top1": 0.9, "status": "completed", "left_chance_epoch": None}}}}
    assert _verdicts(**{"02_convergence": stalled_he})["fig3"] == PARTLY  # Xavier stalls, gradients vanish, He too
    worse_prelu = {**PRELU, "activations": _acts(0.10, 0.118, 0.12)}
    v = _verdicts(**{"03_prelu": worse_prelu})
    assert v["table2"] == NOT_REPRODUCED and v["shared-vs-wise"] == REPRODUCED
    noisy = {**PRELU, "activations": _acts(0.12, 0.115, 0.115, std=0.02, n=3)}
    assert _verdicts(**{"03_prelu": noisy})["table2"] == PARTLY  # better, but within the spread
    off = {**VARIANCE, "schemes": {**VARIANCE["schemes"], "he-fan-in": {"forward_last_ratio_median": 3.0}}}
    assert _verdicts(**{"01_variance": off})["eq10-14"] == PARTLY
    # the pooled (expectation) estimator decides when present; the median is only the spread
    pooled = {**VARIANCE, "schemes": {**VARIANCE["schemes"], "he-fan-in": {
        "forward_last_ratio_median": 0.3, "forward_last_ratio_pooled": 0.95}}}
    assert _verdicts(**{"01_variance": pooled})["eq10-14"] == REPRODUCED
    pooled_off = {**VARIANCE, "schemes": {**VARIANCE["schemes"], "he-fan-in": {
        "forward_last_ratio_median": 0.9, "forward_last_ratio_pooled": 0.3}}}
    assert _verdicts(**{"01_variance": pooled_off})["eq10-14"] == PARTLY


def test_missing_chapters_are_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path))
    table = scorecard()
    assert set(table["verdict"]) == {NOT_RUN}


def test_reads_the_newest_findings_records(tmp_path, monkeypatch):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path))
    results.record_findings("03_prelu", {"seed": 0}, {**PRELU, "activations": _acts(0.10, 0.11, 0.12)})
    results.record_findings("03_prelu", {"seed": 0}, PRELU)
    table = scorecard().set_index("chapter")
    assert table.loc["03_prelu"].iloc[0]["verdict"] == REPRODUCED  # table2 row, from the newer record
    assert table.loc["03_prelu"].iloc[0]["run"]


def test_an_equality_claim_is_not_reproduced_by_noise_alone():
    # one collapsed seed makes the spread huge: "within z standard errors" is then no evidence of equality
    collapsed = {**PRELU, "activations": {**_acts(0.228, 0.1935, 0.1935),
                                          "prelu-shared": {"top1_mean": 0.4325, "top1_std": 0.408, "n_seeds": 3}}}
    assert _verdicts(**{"03_prelu": collapsed})["shared-vs-wise"] == PARTLY
    far = {**PRELU, "xavier_relu": {"top1_mean": 0.789, "top1_std": 0.01, "n_seeds": 2}}
    assert _verdicts(**{"03_prelu": far})["he-xavier-14"] == NOT_REPRODUCED
    close = {**PRELU, "xavier_relu": {"top1_mean": 0.1230, "top1_std": 0.003, "n_seeds": 2}}
    assert _verdicts(**{"03_prelu": close})["he-xavier-14"] == REPRODUCED  # 0.3 points apart


def test_coefficients_that_hardly_moved_show_no_pattern():
    # all within 0.01 of the initial 0.25: conv1 on top by noise is not Table 1's pattern
    still = {"conv1": 0.252, "conv21": 0.249, "conv31": 0.244, "conv32": 0.245, "fc1": 0.249}
    v = _verdicts(**{"03_prelu": {**PRELU, "coefficients": {"prelu-channel-wise": still}}})
    assert v["table1"] == NOT_REPRODUCED
    stage3_only = {"conv1": 0.5, "conv21": 0.6, "conv31": 0.2, "conv32": 0.15, "fc1": 0.07}
    v = _verdicts(**{"03_prelu": {**PRELU, "coefficients": {"prelu-channel-wise": stage3_only}}})
    assert v["table1"] == PARTLY
