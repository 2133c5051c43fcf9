"""delving.theory against hand-worked cases and the paper's numbers (Sec. 2.2)."""

import math

import pytest

from delving.init import SCHEMES
from delving.theory import (LayerSpec, activation_gain, backward_ratios, fan_out_only_forward_product,
                            forward_ratios, vgg_b_layers, vgg_fixed_std_gradient_ratio, weight_variance,
                            xavier_factor)

# 100 -> 200 -> 300 -> 10, ReLU after the first two layers, nothing after the last
FC3 = [LayerSpec.fc(100, 200), LayerSpec.fc(200, 300), LayerSpec.fc(300, 10, a=None)]


def test_layer_spec_fans():
    conv = LayerSpec.conv(3, 64, 128)
    assert (conv.n, conv.n_hat) == (576, 1152)
    assert (FC3[0].n, FC3[0].n_hat) == (100, 200)
    with pytest.raises(ValueError, match="k = 1"):
        LayerSpec("fc", 3, 10, 10)
    with pytest.raises(ValueError, match="kind"):
        LayerSpec("pool", 2, 10, 10)


def test_weight_variance_per_scheme():
    conv = LayerSpec.conv(3, 64, 128, a=0.25)
    expected = {"he-fan-in": 2 / 576, "he-fan-out": 2 / 1152, "he-fan-out-conv": 2 / 1152, "xavier": 1 / 576, "glorot": 2 / (576 + 1152),
                "fixed": 0.02 ** 2, "pytorch": 1 / (3 * 576)}
    assert set(expected) == set(SCHEMES)
    for scheme, var in expected.items():
        assert weight_variance(conv, scheme, std=0.02) == pytest.approx(var)
    # Eq. 15: only the He schemes see the coefficient, and only when asked to
    assert weight_variance(conv, "he-fan-in", prelu_aware=True) == pytest.approx(2 / (1.0625 * 576))
    assert weight_variance(conv, "he-fan-out", prelu_aware=True) == pytest.approx(2 / (1.0625 * 1152))
    assert weight_variance(conv, "xavier", prelu_aware=True) == pytest.approx(1 / 576)
    # no activation after the layer: init falls back to ReLU's a = 0, as the paper does
    assert weight_variance(LayerSpec.conv(3, 64, 128, a=None), "he-fan-in", prelu_aware=True) == pytest.approx(2 / 576)
    # Eq. 14 on conv layers, Eq. 10 on fc layers
    assert weight_variance(LayerSpec.fc(800, 256), "he-fan-out-conv") == pytest.approx(2 / 800)
    assert weight_variance(LayerSpec.fc(800, 256), "he-fan-out") == pytest.approx(2 / 256)
    with pytest.raises(ValueError, match="scheme"):
        weight_variance(conv, "lecun")


def test_activation_gain():
    assert activation_gain(0.0) == 0.5  # Eq. 8: ReLU halves the second moment
    assert activation_gain(0.25) == pytest.approx(1.0625 / 2)
    assert activation_gain(1.0) == activation_gain(None) == 1.0


def test_he_fan_in_keeps_the_forward_signal():
    assert forward_ratios(FC3, "he-fan-in") == pytest.approx([1.0, 1.0, 1.0])


def test_he_fan_in_backward_by_hand():
    # n^_l Var[w_l] gain(a_l): layer 3: 10 * 2/300 * 1; layer 2: 300 * 2/200 / 2; layer 1: 200 * 2/100 / 2
    assert backward_ratios(FC3, "he-fan-in") == pytest.approx([1 / 15 * 1.5 * 2, 1 / 15 * 1.5, 1 / 15])


def test_he_fan_out_keeps_the_backward_signal():
    # every ReLU layer's factor is 1; the last (no ReLU) keeps the 2 of Eq. 14's "/2"
    assert backward_ratios(FC3, "he-fan-out") == pytest.approx([2.0, 2.0, 2.0])


def test_he_fan_out_forward_product_is_c2_over_dL():
    assert forward_ratios(FC3, "he-fan-out") == pytest.approx([1.0, 200 / 300, 200 / 300 * 300 / 10])
    assert fan_out_only_forward_product(FC3) == pytest.approx(200 / 10)
    # telescopes whatever the kernels: n_l / n^_l = c_l / d_l
    net = [LayerSpec.conv(7, 3, 64), LayerSpec.conv(2, 64, 128), LayerSpec.conv(2, 128, 256),
           LayerSpec.conv(3, 256, 512), LayerSpec.fc(512, 4096), LayerSpec.fc(4096, 1000, a=None)]
    assert fan_out_only_forward_product(net) == pytest.approx(64 / 1000)
    assert forward_ratios(net, "he-fan-out")[-1] == pytest.approx(64 / 1000)


def test_xavier_halves_the_variance_per_relu():
    assert forward_ratios(FC3, "xavier") == pytest.approx([1.0, 0.5, 0.25])
    deep = [LayerSpec.conv(3, 64, 64)] * 30
    assert forward_ratios(deep, "xavier") == pytest.approx([2.0 ** -l for l in range(30)])


def test_xavier_factor_is_the_std_ratio_to_he():
    deep = [LayerSpec.conv(3, 64, 64)] * 30  # 29 ReLUs between y_1 and y_30
    std_ratio = math.sqrt(forward_ratios(deep, "xavier")[-1] / forward_ratios(deep, "he-fan-in")[-1])
    assert std_ratio == pytest.approx(xavier_factor(29))
    assert xavier_factor(2) == pytest.approx(0.5)


def test_linear_activation_makes_xavier_exact():
    linear = [LayerSpec.fc(64, 128, a=1.0), LayerSpec.fc(128, 128, a=1.0), LayerSpec.fc(128, 32, a=1.0)]
    assert forward_ratios(linear, "xavier") == pytest.approx([1.0, 1.0, 1.0])
    # Eq. 15 with a = 1 is Xavier
    assert forward_ratios(linear, "he-fan-in", prelu_aware=True) == pytest.approx([1.0, 1.0, 1.0])


def test_prelu_aware_he_cancels_the_coefficient():
    prelu = [LayerSpec.fc(256, 256, a=0.25)] * 9 + [LayerSpec.fc(256, 256, a=None)]
    aware = forward_ratios(prelu, "he-fan-in", prelu_aware=True)
    assert aware[:-1] == pytest.approx([1.0] * 9)
    assert aware[-1] == pytest.approx(1.0625)  # last layer: init assumes ReLU, input came through PReLU
    assert forward_ratios(prelu, "he-fan-in")[-1] == pytest.approx(1.0625 ** 9)
    assert backward_ratios(prelu, "he-fan-out", prelu_aware=True) == pytest.approx([2.0] * 10)
    assert backward_ratios(prelu, "he-fan-out")[0] == pytest.approx(2.0 * 1.0625 ** 9)


def test_vgg_b_he_fan_out_stds():
    layers = vgg_b_layers()
    assert [layer.d for layer in layers] == [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    stds = {layer.d: math.sqrt(weight_variance(layer, "he-fan-out")) for layer in layers}
    assert {d: round(std, 3) for d, std in stds.items()} == {64: 0.059, 128: 0.042, 256: 0.029, 512: 0.021}


def test_vgg_fixed_std_gradient_ratio_is_1_over_17000():
    ratio = vgg_fixed_std_gradient_ratio(0.01)
    assert 1 / ratio == pytest.approx(1.7e4, rel=0.03)
    # the paper's product from conv10 down to conv2, with its rounded stds (in units of 0.01)
    assert 1 / ratio == pytest.approx(5.9 * 4.2 ** 2 * 2.9 ** 2 * 2.1 ** 4, rel=0.03)
    assert vgg_fixed_std_gradient_ratio(0.01, down_to=10) == pytest.approx(0.01 / math.sqrt(2 / (9 * 512)))
