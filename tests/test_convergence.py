"""Chapter 2's experiment logic: left-chance detection, gradient ratios, the run plan and reuse,
and findings that the scorecard reads."""

import math

import pandas as pd
import pytest
import yaml

from delving import convergence as cv
from delving import train
from delving.params import PROFILES_DIR, check_value, spec_for
from delving.scorecard import CLAIMS, NOT_RUN, scorecard


def _metrics(errors, steps_per_epoch=10, every=5):
    return pd.DataFrame({"epoch": [i * every / steps_per_epoch for i in range(len(errors))],
                         "step": [i * every for i in range(len(errors))], "eval_top1": errors})


def test_left_chance_is_the_first_trained_point_below_the_threshold():
    m = _metrics([0.80, 0.91, 0.86, 0.84, 0.95, 0.30])  # step 0 (untrained) below: not counted
    assert cv.left_chance_epoch(m, 0.85) == pytest.approx(1.5)
    assert cv.left_chance_epoch(m, 0.5) == pytest.approx(2.5)
    assert cv.left_chance_epoch(_metrics([0.9, 0.85, 0.9]), 0.85) is None  # at the threshold = still at chance
    assert cv.left_chance_epoch(_metrics([0.9, 0.899, 0.9]), 0.85) is None
    assert cv.left_chance_epoch(pd.DataFrame(), 0.85) is None
    # metrics read back from CSV can hold strings; numbers are what counts
    assert cv.left_chance_epoch(_metrics([0.9, 0.9, 0.5]).astype(str), 0.85) == pytest.approx(1.0)


def _grads(conv1, fc3, first_step=1):
    rows = []
    for i, (a, b) in enumerate(zip(conv1, fc3)):
        step = first_step + i
        rows += [{"step": step, "layer": "conv1", "index": 1, "grad_norm": a},
                 {"step": step, "layer": "fc3", "index": 2, "grad_norm": b}]
    return pd.DataFrame(rows)


def test_grad_ratio_averages_the_first_steps_both_runs_logged():
    he = _grads([2.0, 4.0, 100.0], [1.0, 1.0, 1.0])
    xavier = _grads([0.01, 0.03, 1.0], [0.5, 0.5, 0.5])
    assert cv.grad_ratio(he, xavier, steps=2) == pytest.approx(3.0 / 0.02)  # step 3 is past the first 2
    assert cv.grad_ratio(he, xavier, steps=2, layer="fc3") == pytest.approx(2.0)
    # only steps both runs have: Xavier's log starts at step 2
    assert cv.grad_ratio(he, _grads([0.03, 1.0], [0.5, 0.5], first_step=2), steps=2) == pytest.approx(4.0 / 0.03)
    assert cv.grad_ratio(he, _grads([0.0, 0.0], [1, 1]), steps=2) is None
    per_layer = cv.layer_ratios(he, xavier, steps=2)
    assert list(per_layer.layer) == ["conv1", "fc3"]
    assert per_layer.he_over_xavier.tolist() == pytest.approx([150.0, 2.0])
    g = cv.first_steps_grad_norms(he, 2)
    assert g.loc[0, "layer"] == "conv1" and g.loc[0, "min"] == 2.0 and g.loc[0, "max"] == 4.0


def _tiny(**overrides):
    P = yaml.safe_load((PROFILES_DIR / "tiny" / "02_convergence.yaml").read_text())
    P.update(dict(width=0.0625, batch_size=8, max_steps=2, train_subset=64, eval_subset=20, test_subset=20,
                  evals_per_epoch=2, grad_steps=2, grad_norm_every=1, sweep_lrs=[0.003, 0.01],
                  sweep_inits=["he-fan-in"], threads=1), **overrides)
    spec = spec_for("02_convergence")
    assert set(P) == set(spec)
    return {k: check_value(k, v, spec[k], check_paths=False) for k, v in P.items()}


def test_plan_keeps_everything_but_model_init_and_lr_equal():
    P = _tiny(he_init="he-fan-out")
    specs = cv.plan(P)
    by = {(s.role, s.model, s.init, s.lr): s.config.to_dict() for s in specs}
    d30, d14 = by[("main", "deep30", "he-fan-out", 0.003)], by[("depth", "small14", "he-fan-out", 0.003)]
    assert {k for k in d30 if d30[k] != d14[k]} == {"model"}  # 30 vs 14 layers: nothing else differs
    he, xa = by[("main", "model_b", "he-fan-out", 0.003)], by[("main", "model_b", "xavier", 0.003)]
    assert {k for k in he if he[k] != xa[k]} == {"init"}
    assert he["init"] == "he-fan-out" and xa["init"] == "xavier" and he["lr_steps"] == []
    sweep_at_main = by[("sweep", "deep30", "he-fan-in", 0.003)]
    assert {k for k in sweep_at_main if sweep_at_main[k] != d30[k]} == {"init"}
    assert len([s for s in specs if s.role == "sweep"]) == 2
    assert cv.plan(_tiny(sweep_max_steps=1))[-1].config.max_steps == 1
    assert cv.plan(_tiny(model_b_epochs=2))[0].config.epochs == 2


def test_a_data_set_train_cannot_load_stops_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path))
    monkeypatch.setattr(train, "DATASETS", ("fashion-mnist",))
    P = _tiny(dataset="imagefolder", data_dir=str(tmp_path))
    with pytest.raises(cv.DatasetUnavailable, match="imagefolder.*ImageNet image-folder loader.*Nothing was trained"):
        cv.run(P)
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(train, "DATASETS", ("fashion-mnist", "imagefolder"))
    with pytest.raises(cv.DatasetUnavailable, match="data_dir"):
        cv.require_dataset(_tiny(dataset="imagefolder", data_dir=None))


def test_tiny_runs_give_the_scorecards_schema_and_are_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path))
    P = _tiny()
    runs = cv.run(P)
    assert not any(runs.reused[s.key] for s in runs.specs if s.role != "sweep")
    assert runs.reused["sweep/deep30/he-fan-in/lr=0.003"]  # the main run, not trained twice
    assert len(runs.unique()) == 6
    assert (cv.weight_layers(runs, "deep30"), cv.weight_layers(runs, "model_b")) == (30, 22)
    assert cv.num_classes(P) == 10
    F = cv.findings(P, runs)
    assert set(F["models"]) == {"deep30", "model_b", "small14"}
    for model, inits in (("deep30", {"he", "xavier"}), ("model_b", {"he", "xavier"}), ("small14", {"he"})):
        assert set(F["models"][model]) == inits
        for e in F["models"][model].values():
            assert {"final_top1", "status", "left_chance_epoch"} <= set(e)
            assert 0 <= e["final_top1"] <= 1 and e["status"] == "completed"
            assert e["left_chance_epoch"] is None or e["left_chance_epoch"] > 0
    ratios = F["grad_ratio_first_layer"]
    assert set(ratios) == {"deep30", "model_b"} and all(math.isfinite(r) and r > 1 for r in ratios.values())
    assert isinstance(F["scale"], str) and F["scale"]
    assert [r["lr"] for r in F["sweep"]["runs"]] == [0.003, 0.01]

    table = scorecard(findings={"02_convergence": F}).set_index(pd.Index([c.key for c in CLAIMS]))
    for key, model in (("fig2", "model_b"), ("fig3", "deep30")):
        assert table.loc[key, "verdict"] != NOT_RUN
        assert f"He {F['models'][model]['he']['final_top1']:.3g}" in table.loc[key, "ours"]
    assert table.loc["deeper-worse", "verdict"] != NOT_RUN and "n/a" not in table.loc["deeper-worse", "ours"]

    again = cv.run(P)  # a second pass trains nothing
    assert all(again.reused.values())
    assert [r.dir for r in again.unique()] == [r.dir for r in runs.unique()]


def test_fan_out_products_by_hand():
    # deep30 at width 1/16 on 28x28: fc1 800 -> 256 (SPP output), fc2 256 -> 256, fc3 256 -> 10 classes
    P = {"dataset": "fashion-mnist", "width": 0.0625}
    ours = cv.fan_out_products(P, "deep30")["ours"]
    assert ours["fc"] == pytest.approx(800 / 256 * 256 / 256 * 256 / 10)
    assert ours["all"] == pytest.approx(ours["conv"] * ours["fc"])
    paper = cv.fan_out_products(P, "deep30")["paper"]
    # full width at 224: fc1 12800 -> 4096 (256 channels x 50 bins of SPP {6, 3, 2, 1}), fc3 4096 -> 1000
    assert paper["fc"] == pytest.approx(12800 / 4096 * 4096 / 1000)
    assert paper["conv"] == pytest.approx(64 / 256)  # c_2 / d_L: conv2's 64 inputs, the last conv's 256 outputs
