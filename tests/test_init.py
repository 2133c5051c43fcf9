"""delving.init against closed forms (Sec. 2.2, Eq. 10, 14, 15) and torch.nn.init references."""

import math

import pytest
import torch
from torch import nn

from delving.init import (SCHEMES, fans, fixed_normal_, glorot_uniform_, he_normal_, init_model,
                          pytorch_default_, xavier_normal_)
from delving.theory import LayerSpec, weight_variance

# (d, c, k, k) conv weights over k in {1, 2, 3, 7} and (d, c) fc weights
CONV_SHAPES = [(64, 3, 7, 7), (128, 64, 3, 3), (256, 128, 2, 2), (16, 256, 1, 1), (96, 32, 3, 3)]
FC_SHAPES = [(1000, 512), (10, 256), (4096, 63)]
SHAPES = CONV_SHAPES + FC_SHAPES


def pooled_samples(fill, shape, min_count=100_000, seed=0):
    """Fill a weight of ``shape`` repeatedly until there are at least ``min_count`` draws."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(shape)
    repeats = max(1, math.ceil(min_count / w.numel()))
    return torch.cat([fill(w, gen).flatten().clone() for _ in range(repeats)]).double()


def assert_moments(samples, expected_var, n_se=5.0):
    """Mean 0 and variance ``expected_var``, each within ``n_se`` standard errors of its estimate."""
    n = samples.numel()
    var = samples.var().item()
    fourth = ((samples - samples.mean()) ** 4).mean().item()
    var_se = math.sqrt((fourth - var * var) / n)  # SE of the sample variance, any distribution
    assert abs(samples.mean().item()) < n_se * math.sqrt(var / n)
    assert abs(var - expected_var) < n_se * var_se, (var, expected_var, var_se)


def spec_of(shape):
    return LayerSpec.conv(shape[2], shape[1], shape[0]) if len(shape) == 4 else LayerSpec.fc(shape[1], shape[0])


def test_fans_are_k2c_and_k2d():
    assert fans(torch.empty(128, 64, 3, 3)) == (9 * 64, 9 * 128)
    assert fans(torch.empty(1000, 4096)) == (4096, 1000)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("a", [0.0, 0.25])
def test_he_normal_variance_is_eq10_eq14_eq15(shape, mode, a):
    n = spec_of(shape).n if mode == "fan_in" else spec_of(shape).n_hat
    samples = pooled_samples(lambda w, g: he_normal_(w, mode, a, generator=g), shape)
    assert_moments(samples, 2.0 / ((1.0 + a * a) * n))


@pytest.mark.parametrize("shape", [(128, 64, 3, 3), (64, 3, 7, 7), (10, 256)])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("a", [0.0, 0.25, 1.0])
def test_he_normal_equals_torch_kaiming_normal(shape, mode, a):
    ours = he_normal_(torch.empty(shape), mode, a, generator=torch.Generator().manual_seed(3))
    torchs = nn.init.kaiming_normal_(torch.empty(shape), a=a, mode=mode, nonlinearity="leaky_relu",
                                     generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, torchs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_xavier_normal_variance_is_one_over_n(shape, mode):
    n = spec_of(shape).n if mode == "fan_in" else spec_of(shape).n_hat
    assert_moments(pooled_samples(lambda w, g: xavier_normal_(w, mode, generator=g), shape), 1.0 / n)


def test_xavier_is_he_with_linear_coefficient():
    # Eq. 15 with a = 1 (a linear "rectifier") is the paper's Xavier
    ours = xavier_normal_(torch.empty(96, 32, 3, 3), generator=torch.Generator().manual_seed(1))
    he_linear = he_normal_(torch.empty(96, 32, 3, 3), "fan_in", 1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, he_linear, rtol=1e-6, atol=0)


def test_xavier_equals_torch_only_where_fan_in_equals_fan_out():
    square = (64, 64, 3, 3)
    torch.testing.assert_close(xavier_normal_(torch.empty(square), generator=torch.Generator().manual_seed(2)),
                               nn.init.xavier_normal_(torch.empty(square), generator=torch.Generator().manual_seed(2)),
                               rtol=1e-6, atol=0)
    widening = (128, 64, 3, 3)  # torch averages the fans: std ratio sqrt((n + n^) / (2 n)) = sqrt(1.5)
    ours = xavier_normal_(torch.empty(widening), generator=torch.Generator().manual_seed(2))
    torchs = nn.init.xavier_normal_(torch.empty(widening), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours / torchs, torch.full(widening, math.sqrt(1.5)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_glorot_uniform_is_glorots_original(shape):
    spec = spec_of(shape)
    samples = pooled_samples(lambda w, g: glorot_uniform_(w, generator=g), shape)
    assert samples.abs().max() <= math.sqrt(6.0 / (spec.n + spec.n_hat))
    assert_moments(samples, 2.0 / (spec.n + spec.n_hat))
    torch.testing.assert_close(glorot_uniform_(torch.empty(shape), generator=torch.Generator().manual_seed(4)),
                               nn.init.xavier_uniform_(torch.empty(shape), generator=torch.Generator().manual_seed(4)),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("std", [0.01, 0.05])
def test_fixed_normal_ignores_shape(std):
    for shape in [(512, 512, 3, 3), (10, 256)]:
        assert_moments(pooled_samples(lambda w, g: fixed_normal_(w, std, generator=g), shape), std * std)


@pytest.mark.parametrize("make_layer", [lambda: nn.Conv2d(64, 128, 3), lambda: nn.Conv2d(3, 64, 7),
                                        lambda: nn.Linear(4096, 1000)])
def test_pytorch_default_variance_is_one_third_over_fan_in(make_layer):
    layer = make_layer()
    fan_in = fans(layer.weight)[0]
    samples = pooled_samples(lambda w, g: pytorch_default_(layer, generator=g).weight.detach(), layer.weight.shape)
    assert_moments(samples, 1.0 / (3.0 * fan_in))  # neither He (2/n) nor Xavier (1/n)
    assert layer.bias.abs().max() <= 1.0 / math.sqrt(fan_in)


def test_pytorch_default_with_generator_replays_reset_parameters():
    layer = nn.Conv2d(16, 32, 3)
    torch.manual_seed(5)
    pytorch_default_(layer)
    expected = [p.detach().clone() for p in layer.parameters()]
    pytorch_default_(layer, generator=torch.Generator().manual_seed(5))
    for got, want in zip(layer.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)


def nested_model():
    """Conv and fc layers, nested, with a PReLU whose parameter init_model must not touch."""
    body = nn.Sequential(nn.Conv2d(16, 64, 3), nn.PReLU(init=0.25), nn.Conv2d(64, 64, 2))
    body[0].following_prelu_init = 0.25
    return nn.Sequential(body, nn.ReLU(), nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_init_model_matches_theory_weight_variance(scheme):
    model = nested_model()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    gen = torch.Generator().manual_seed(6)
    draws = {id(layer): [] for layer in layers}
    for _ in range(12):
        init_model(model, scheme, std=0.02, prelu_aware=True, generator=gen)
        for layer in layers:
            draws[id(layer)].append(layer.weight.detach().flatten().clone())
    for layer in layers:
        shape = tuple(layer.weight.shape)
        spec = spec_of(shape)
        spec = LayerSpec(spec.kind, spec.k, spec.c, spec.d, getattr(layer, "following_prelu_init", None))
        expected = weight_variance(spec, scheme, std=0.02, prelu_aware=True)
        assert_moments(torch.cat(draws[id(layer)]).double(), expected)
        if scheme == "pytorch":
            assert layer.bias.abs().sum() > 0  # torch's own bias is kept
        else:
            assert torch.all(layer.bias == 0)
    assert torch.all(model[0][1].weight == 0.25)


def test_he_fan_out_conv_is_eq14_on_convs_and_eq10_on_fc_layers():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    gen = torch.Generator().manual_seed(2)
    draws = {0: [], 3: [], 5: []}
    for _ in range(40):
        init_model(model, "he-fan-out-conv", generator=gen)
        for i in draws:
            draws[i].append(model[i].weight.detach().flatten().clone())
    assert_moments(torch.cat(draws[0]).double(), 2 / (3 * 3 * 16))  # conv: n^ = k^2 d
    assert_moments(torch.cat(draws[3]).double(), 2 / 64)            # fc1: n = c (not 2 / 512)
    assert_moments(torch.cat(draws[5]).double(), 2 / 512)           # fc3: n = c (not 2 / 10)


@pytest.mark.parametrize("scheme, mode", [("he-fan-in", "fan_in"), ("he-fan-out", "fan_out")])
def test_init_model_prelu_aware_uses_the_following_coefficient(scheme, mode):
    def one_layer(seed, prelu_aware, **kwargs):
        layer = nn.Conv2d(8, 16, 3)
        layer.following_prelu_init = 0.25
        init_model(nn.Sequential(layer), scheme, prelu_aware=prelu_aware,
                   generator=torch.Generator().manual_seed(seed), **kwargs)
        return layer.weight.detach()

    def reference(a):
        return he_normal_(torch.empty(16, 8, 3, 3), mode, a, generator=torch.Generator().manual_seed(7))

    torch.testing.assert_close(one_layer(7, True), reference(0.25), rtol=1e-6, atol=0)
    torch.testing.assert_close(one_layer(7, False), reference(0.0), rtol=1e-6, atol=0)
    # an explicit mapping (by module name) wins over the attribute; None there means ReLU
    torch.testing.assert_close(one_layer(7, True, following_prelu_init={"0": 0.5}), reference(0.5), rtol=1e-6, atol=0)
    torch.testing.assert_close(one_layer(7, True, following_prelu_init={"0": None}), reference(0.0), rtol=1e-6, atol=0)


def test_init_model_rejects_unknown_scheme_naming_the_choices():
    with pytest.raises(ValueError) as error:
        init_model(nested_model(), "kaiming")
    message = str(error.value)
    assert "scheme" in message and "'kaiming'" in message
    assert all(scheme in message for scheme in SCHEMES)


def test_he_normal_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        he_normal_(torch.empty(4, 4), "fan_avg")
