"""Chapter 3's logic (delving.prelu): which runs, what is read back, the findings the scorecard reads."""

import math

import pandas as pd
import pytest
import yaml

from delving import prelu, results
from delving.params import PROFILES_DIR, check
from delving.scorecard import NOT_RUN, REPRODUCED, Thresholds, scorecard


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def params(profile="tiny", **overrides):
    values = yaml.safe_load((PROFILES_DIR / profile / "03_prelu.yaml").read_text())
    return check("03_prelu", {**values, **overrides})


def test_the_runs_of_the_chapter():
    P = params("cpu")
    configs = prelu.configs(P)
    assert len(configs) == 3 * 3 + 2
    he, xavier = configs[:9], configs[9:]
    assert {(c.activation, c.seed) for c in he} == {(a, s) for a in prelu.ACTIVATIONS for s in (0, 1, 2)}
    assert all(c.model == "small14" and c.experiment == "prelu" for c in configs)
    assert all(c.init == "he-fan-out" for c in he)
    assert [(c.activation, c.init, c.seed) for c in xavier] == [("relu", "xavier", 0), ("relu", "xavier", 1)]
    assert all(c.prelu_aware and c.lr_steps == [2] and c.dataset == "fashion-mnist" for c in configs)
    gpu = prelu.configs(params("gpu-imagenet", data_dir=None, dataset="fashion-mnist"))
    assert gpu[0].width == 1.0 and gpu[0].lr_schedule == "plateau" and gpu[0].lr_steps == []
    assert gpu[0].scale_range == [256, 256] and gpu[0].eval_views == "ten" and gpu[0].epochs == 75


@pytest.mark.timeout(120)
def test_runs_findings_and_the_scorecard(results_dir):
    # Two worker processes (as the CPU profile trains), then a rerun that reuses the finished runs.
    P = params(seeds=[0, 1], xavier_seeds=1, train_subset=256, test_subset=128, epochs=1, lr_steps=None, processes=2)
    records = prelu.run_all(P)
    assert [(r.params["activation"], r.params["init"], r.params["seed"]) for r in records] == \
        [(c.activation, c.init, c.seed) for c in prelu.configs(P)]
    assert all(r.finished for r in records)

    table = prelu.runs_table(records)
    assert len(table) == 7 and set(table.init) == {"he-fan-out", "xavier"}
    F = prelu.findings(P, records)
    assert set(F) == {"scale", "protocol", "activations", "coefficients", "xavier_relu"}
    for activation, a in F["activations"].items():
        assert set(a) == {"top1_mean", "top1_std", "top5_mean", "top5_std", "n_seeds", "top1_all"}
        done = table[(table.activation == activation) & (table.init == "he-fan-out") & (table.status == "completed")]
        assert a["n_seeds"] == len(done) and a["top1_all"] == pytest.approx(list(done.top1))
        assert a["top1_mean"] == pytest.approx(done.top1.mean())
    assert set(F["xavier_relu"]) == {"top1_mean", "top1_std", "n_seeds"} and F["xavier_relu"]["n_seeds"] == 1
    c = prelu.coefficients(records)
    for kind in ("prelu-shared", "prelu-channel-wise"):
        assert list(F["coefficients"][kind]) == list(prelu.LAYERS)
        assert F["coefficients"][kind]["conv1"] == pytest.approx(
            c[(c.activation == kind) & (c.layer == "conv1")]["mean"].mean())
    assert set(c[c.activation == "prelu-shared"].channels) == {1}
    assert c[(c.activation == "prelu-channel-wise") & (c.layer == "conv1")].channels.iloc[0] == 4  # 64 / 16
    assert "Fashion-MNIST" in F["scale"] and "single view of the full 28x28 image" in F["protocol"]

    ct = prelu.coefficient_table(records)
    assert list(ct.layer) == list(prelu.LAYERS) and ct["prelu-channel-wise paper"].iloc[0] == 0.596
    table2 = scorecard(Thresholds(), {"03_prelu": F}).set_index("claim")
    verdicts = table2[table2.chapter == "03_prelu"].verdict
    assert (verdicts != NOT_RUN).sum() == 4  # Table 2, shared vs wise, Table 1, He vs Xavier: judged
    record = results.record_findings("03_prelu", P, F, runs=records)
    assert record.summary["findings"]["activations"].keys() == F["activations"].keys()
    assert len(record.summary["source_runs"]) == 7
    assert len(prelu.verdict(F)) == 6

    again = prelu.run_all({**P, "reuse": True, "processes": 1})
    assert [r.dir for r in again] == [r.dir for r in records]
    assert len(results.find_runs(prelu.EXPERIMENT)) == 7  # nothing trained twice


def _record_table(rows):
    return pd.DataFrame([{"activation": a, "init": i, "seed": s, "status": st, "top1": t1, "top5": t1 / 4}
                         for a, i, s, st, t1 in rows])


def test_summary_leaves_out_diverged_runs_and_pairs_by_seed():
    t = _record_table([("relu", "he", 0, "completed", 0.20), ("relu", "he", 1, "completed", 0.22),
                       ("relu", "he", 2, "diverged", math.nan),
                       ("prelu-channel-wise", "he", 0, "completed", 0.18),
                       ("prelu-channel-wise", "he", 1, "completed", 0.21),
                       ("prelu-channel-wise", "he", 2, "completed", 0.19)])
    s = prelu.activation_summary(t).set_index("activation")
    assert s.loc["relu", "n_seeds"] == 2 and s.loc["relu", "diverged"] == 1
    assert s.loc["relu", "top1_mean"] == pytest.approx(0.21)
    assert s.loc["relu", "top1_std"] == pytest.approx(pd.Series([0.20, 0.22]).std())
    d = prelu.paired_differences(t, "he")
    assert list(d.seed) == [0, 1] and d.diff_points.tolist() == pytest.approx([-2.0, -1.0])  # seed 2: no ReLU


def test_verdict_states_the_differences_and_the_coefficient_pattern():
    mk = lambda m, s=0.003, n=3: {"top1_mean": m, "top1_std": s, "top5_mean": m / 3, "top5_std": s, "n_seeds": n,
                                  "top1_all": [m] * n}
    F = {"scale": "x", "protocol": "y",
         "activations": {"relu": mk(0.12), "prelu-shared": mk(0.105), "prelu-channel-wise": mk(0.104)},
         "coefficients": {"prelu-channel-wise": {"conv1": 0.6, "conv21": 0.3, "conv31": 0.1, "conv32": 0.15,
                                                 "fc1": 0.07}},
         "xavier_relu": {"top1_mean": 0.121, "top1_std": 0.003, "n_seeds": 2}}
    text = "\n".join(prelu.verdict(F))
    assert "PReLU lowers it by 1.60 points" in text and "beyond the spread" in text
    assert "Channel-shared against channel-wise" in text and "no clear difference" in text
    assert "the largest conv layer is conv1 as in the paper" in text and "pattern (conv1 largest" in text
    assert "Xavier 12.10 %" in text
    diff, se = prelu.difference(F["activations"]["relu"], F["activations"]["prelu-channel-wise"])
    assert diff == pytest.approx(1.6) and se == pytest.approx(100 * math.sqrt(2 * 0.003 ** 2 / 3))
    verdicts = scorecard(Thresholds(), {"03_prelu": F})
    assert (verdicts[verdicts.chapter == "03_prelu"].verdict == REPRODUCED).sum() == 4


def test_scale_and_protocol_name_the_setting():
    P = params("gpu-imagenet", data_dir=None)
    assert "10-view" in prelu.protocol(P) and "whole val set" in prelu.protocol(P)
    assert "224 crops" in prelu.scale(P) and "full width" in prelu.scale(P)
    assert prelu.gpu_count(params()) == 0  # the CPU: no torchrun
