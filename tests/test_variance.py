"""delving.variance: chapter 1's cases, run record, read-back and findings (all on small nets)."""

import math

import pytest
import torch

from delving import results, variance
from delving.scorecard import CLAIMS, NOT_RUN, Thresholds, scorecard
from delving.theory import LayerSpec, forward_ratios

TINY = dict(depth=4, width=8, kernel_size=3, spatial=4, activation="relu", prelu_a=[0.0, 0.25, 1.0],
            schemes=["he-fan-in", "he-fan-out", "xavier", "glorot", "fixed", "pytorch"], draws=3,
            batch_size=4, seed=0, device="cpu")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DELVING_RESULTS", str(tmp_path / "results"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    return variance.run(TINY, root=tmp_path_factory.mktemp("results"))


def test_plan_covers_every_study():
    cases = variance.plan(TINY)
    studies = {c.study for c in cases}
    assert studies == set(variance.STUDIES)
    schemes = [c for c in cases if c.study == "schemes"]
    assert [(c.arch, c.scheme) for c in schemes] == [(a, s) for a in ("conv", "mlp") for s in TINY["schemes"]]
    assert all(c.activation == "relu" and c.a == 0.0 and not c.prelu_aware for c in schemes)
    prelu = [(c.arch, c.a, c.prelu_aware) for c in cases if c.study == "prelu"]
    assert ("conv", 0.25, True) in prelu and ("mlp", 1.0, False) in prelu and ("mlp", 0.0, False) not in prelu
    under = [c for c in cases if c.study == "underflow"]
    assert {c.dtype for c in under} == {"float32", "float64"}
    assert under[0].depth >= variance.float32_underflow_layer(TINY["width"])
    assert len({c.key for c in cases}) == len(cases)


def test_plan_uses_prelu_and_float64_where_asked():
    cases = variance.plan({**TINY, "activation": "prelu", "depth": 30, "width": 64, "schemes": ["he-fan-in", "fixed"]})
    he = next(c for c in cases if c.study == "schemes" and c.scheme == "he-fan-in")
    assert (he.activation, he.a, he.prelu_aware) == ("prelu", 0.0, True)  # a = prelu_a[0]
    fixed = {c.arch: c.dtype for c in cases if c.study == "schemes" and c.scheme == "fixed"}
    # std 0.01 over 30 layers: with n = 9 * 64 the signal's std stays near 1e-23, but with n = 64 units
    # it passes 1e-36, too close to float32's floor
    assert fixed == {"conv": "float32", "mlp": "float64"}
    assert not [c for c in cases if c.study == "widening" and c.scheme == "fixed"]


def test_theory_helpers():
    specs = [LayerSpec.fc(100, 100)] * 5
    plain = variance.forward_variances(specs, "he-fan-in")
    assert plain == pytest.approx([2.0] * 5)  # n Var[w] E[x^2] = 2 * 1 for N(0, 1) input, then flat
    assert [v / plain[0] for v in plain] == pytest.approx(forward_ratios(specs, "he-fan-in"))
    biased = variance.forward_variances(specs, "pytorch", with_bias=True)
    fixed_point = 2.0 / (5.0 * 100)  # v = v / 6 + 1 / (3 n)
    assert biased[0] == pytest.approx(1 / 3 + 1 / 300)
    assert abs(biased[-1] - fixed_point) < abs(biased[0] - fixed_point) / 6 ** 3
    # std 0.01, n = 576: each layer multiplies Var by 0.0288; the std passes 2^-149 near layer 58
    layer = variance.float32_underflow_layer(576)
    v1 = 576 * 1e-4
    assert math.sqrt(v1 * 0.0288 ** (layer - 1)) < 2.0 ** -149 <= math.sqrt(v1 * 0.0288 ** (layer - 2))
    assert variance.float32_underflow_layer(40000) is None  # n std^2 / 2 = 2: grows
    assert variance.widening_widths(6, 8) == [8, 8, 16, 16, 32, 32]


def test_paper_numbers_and_models():
    numbers = variance.paper_numbers().set_index("key").ours
    assert [round(numbers[f"vgg_std_{d}"], 3) for d in (64, 128, 256, 512)] == [0.059, 0.042, 0.029, 0.021]
    assert numbers["fixed_std_gradient_ratio"] == pytest.approx(1.7e4, rel=0.05)
    assert numbers["xavier_std_factor_30"] == pytest.approx(2.0 ** -15)
    models = variance.model_products(("small14", "model_a")).set_index("model")
    assert models.loc["small14", "c_2 / d_L"] == 64 / 256 == models.loc["small14", "product over conv layers"]
    assert models.loc["model_a", "c_2 / d_L"] == pytest.approx(96 / 512)
    # over all layers the SPP's bins enter: c_2 * bins / 1000
    assert models.loc["small14", "product over all layers"] == pytest.approx(64 * 50 / 1000)


def test_run_writes_a_record_that_reads_back(tiny_record):
    record = results.load_run(tiny_record.dir)
    assert record.experiment == "variance" and record.status == "completed"
    assert record.params == TINY
    for table in ("cases", "layers", "theory", "paper_numbers", "models"):
        assert len(record.table(table)), table
    cases = record.table("cases")
    assert len(cases) == len(variance.plan(TINY))
    layers = record.table("layers")
    assert set(layers.columns) >= {"case", "draw", "layer", "forward_var", "backward_var", "output_grad_var"}
    assert layers.groupby("case").draw.nunique().to_dict() == dict(zip(cases.case, cases.draws))
    assert record.summary["findings"] == variance.findings(record)


def test_findings_follow_the_scorecard_schema(tiny_record):
    f = tiny_record.summary["findings"]
    assert f["depth"] == TINY["depth"] and "conv stack" in f["scale"]
    he, fan_out = f["schemes"]["he-fan-in"], f["schemes"]["he-fan-out"]
    assert isinstance(he["forward_last_ratio_median"], float) and len(he["forward_last_ratio_iqr"]) == 2
    assert isinstance(fan_out["backward_first_ratio_median"], float) and len(fan_out["backward_first_ratio_iqr"]) == 2
    assert he["forward_last_ratio_iqr"][0] <= he["forward_last_ratio_median"] <= he["forward_last_ratio_iqr"][1]
    assert set(f["schemes"]) == set(TINY["schemes"]) == set(f["mlp"]["schemes"])
    x = f["xavier_factor"]
    assert x["layers"] == TINY["depth"] - 1 and x["predicted"] == pytest.approx(2.0 ** -(TINY["depth"] - 1))
    assert len(f["paper_numbers"]["vgg_stds"]) == 4 and f["paper_numbers"]["fixed_std_gradient_ratio"] > 1e4
    table = scorecard(Thresholds(), {"01_variance": f})
    mine = table[table.chapter == "01_variance"]
    assert len(mine) == sum(c.chapter == "01_variance" for c in CLAIMS) and NOT_RUN not in set(mine.verdict)
    assert (mine.scale == f["scale"]).all()


def test_he_on_an_mlp_is_on_the_line():
    P = {**TINY, "depth": 8, "width": 256, "draws": 24, "batch_size": 32}
    cases = [variance.Case("schemes", "mlp", s, "relu", 0.0, False, 8) for s in ("he-fan-in", "he-fan-out")]
    record = variance.run(P, cases=cases)
    summary = variance.layer_summary(record)
    for case in cases:
        e = variance.endpoint(summary, case.key)
        assert e["forward_last_predicted"] == 1.0 and e["backward_first_predicted"] == 2.0
        for key in ("forward_last_ratio_pooled", "backward_first_ratio_pooled", "forward_last_ratio_median"):
            assert 0.75 < e[key] < 1.25, (case.scheme, key, e[key])
    rows = summary[summary.case == cases[0].key]
    assert (rows.forward_pooled / rows.forward_theory).between(0.75, 1.25).all()


def test_float32_underflow_is_measured_as_zero():
    P = {**TINY, "width": 16, "draws": 2}
    layer = variance.float32_underflow_layer(16)
    cases = [variance.Case("underflow", "mlp", "fixed", "relu", 0.0, False, layer + 3, dtype)
             for dtype in ("float32", "float64")]
    summary = variance.layer_summary(variance.run(P, cases=cases))
    f32, f64 = (summary[summary.dtype == d].sort_values("layer") for d in ("float32", "float64"))
    assert (f32.forward_zero_draws.iloc[layer:] == 2).all()  # layers past the underflow: exactly 0
    assert (f64.forward_zero_draws == 0).all()
    # float64 still follows Eq. 9 (over ~100 decades; 16 units, 2 draws: within a few decades)
    assert (f64.forward_pooled / f64.forward_theory).between(1e-3, 1e3).all()
    assert (f32.backward_zero_draws.iloc[:layer] == 2).all()  # the zeroed ReLUs below kill the gradient
