"""Architectures of Table 1 / Table 3 / Fig. 3 and PReLU of Sec. 2.1 (delving.models).
Full-size models are built on the meta device (shapes only, no memory, no arithmetic)."""

import pytest
import torch
import torch.nn as nn

from delving.models import (ACTIVATIONS, MODELS, SPP, PaddedConv2d, build_model, count_macs, deep30,
                            make_activation, small14)

TINY = dict(in_channels=1, input_size=28, num_classes=10, width=1 / 8)  # the CPU-scale setting


def meta(name, **kwargs):
    with torch.device("meta"):
        return build_model(name, **kwargs)


def output_sizes(model, input_size, in_channels):
    """{layer name: (H, W) of its output} from one forward pass on the model's device."""
    sizes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[2:])))
             for n, m in model.weight_layers()]
    model(torch.zeros(1, in_channels, input_size, input_size, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize("name,layers", [("small14", 14), ("model_a", 19), ("model_b", 22), ("model_c", 22),
                                         ("deep30", 30)])
def test_weight_layer_counts(name, layers):
    names = [n for n, _ in meta(name).weight_layers()]
    assert len(names) == layers and len(set(names)) == layers
    assert names[0] == "conv1" and names[-3:] == ["fc1", "fc2", "fc3"]


def test_table1_layer_names():
    expected = ["conv1", *(f"conv2{i}" for i in range(1, 5)), *(f"conv3{i}" for i in range(1, 7)), "fc1", "fc2", "fc3"]
    assert [n for n, _ in meta("small14").weight_layers()] == expected
    deep = [n for n, _ in meta("deep30").weight_layers()]
    assert deep[:11] == expected[:11] and deep[11:27] == [f"conv3{i}" for i in range(7, 23)]
    assert [n for n, _ in meta("deep30", extra_layers=3).weight_layers()][11:14] == ["conv37", "conv38", "conv39"]


def test_output_shape_224():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert small14()(x).shape == (2, 1000)
        assert deep30()(x).shape == (2, 1000)


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape_28x28(name):
    torch.manual_seed(0)
    model = build_model(name, **TINY)
    assert model.stem == "small"
    y = model(torch.randn(2, 1, 28, 28))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


@pytest.mark.parametrize("name,paper", [("model_a", 1.90e10), ("model_b", 2.32e10), ("model_c", 5.30e10)])
def test_table3_macs(name, paper):
    macs = count_macs(meta(name), 224, 3)
    print(f"{name}: {macs:.4e} multiply-adds (paper {paper:.2e}, {macs / paper - 1:+.2%})")
    assert abs(macs / paper - 1) < 0.05


def test_count_macs_by_hand():
    """H_out W_out k^2 c_in c_out per conv, in * out per fc, for small14 at 1x28x28, width 1/8."""
    by_hand = (28 * 28 * 9 * 1 * 8 + 14 * 14 * 4 * 8 * 16 + 3 * 14 * 14 * 4 * 16 * 16  # conv1, conv21-24
               + 7 * 7 * 4 * 16 * 32 + 5 * 7 * 7 * 4 * 32 * 32  # conv31-36
               + 32 * 50 * 512 + 512 * 512 + 512 * 10)  # fc1 (32 channels x 50 SPP bins), fc2, fc3
    assert count_macs(small14(**TINY)) == by_hand == count_macs(meta("small14", **TINY), 28, 1)


def test_stage_sizes():
    s = output_sizes(meta("small14"), 224, 3)
    assert s["conv1"] == (112, 112) and s["conv24"] == (37, 37) and s["conv36"] == (18, 18)  # paper ~36, ~18
    assert output_sizes(meta("deep30"), 224, 3)["conv322"] == (18, 18)
    for name in ("model_a", "model_b", "model_c"):
        s = output_sizes(meta(name), 224, 3)
        assert (s["conv21"], s["conv31"], s["conv41"]) == ((56, 56), (28, 28), (14, 14))
    s = output_sizes(meta("small14", **TINY), 28, 1)
    assert (s["conv1"], s["conv24"], s["conv36"]) == ((28, 28), (14, 14), (7, 7))
    s = output_sizes(meta("model_b", **TINY), 28, 1)
    assert (s["conv21"], s["conv31"], s["conv41"]) == ((14, 14), (7, 7), (4, 4))


def test_stem_choice():
    assert meta("small14").stem == "imagenet" and meta("small14", input_size=32).stem == "small"
    assert meta("model_a", input_size=28, stem="imagenet").features.conv1.kernel_size == (7, 7)
    assert meta("model_a", stem="small").features.conv1.kernel_size == (3, 3)


def test_width_scaling():
    model = meta("model_c", width=1 / 8)
    assert [m.out_channels for n, m in model.weight_layers() if n in ("conv1", "conv21", "conv31", "conv41")] \
        == [12, 48, 96, 112]
    assert model.classifier.fc1.out_features == 512 and model.classifier.fc3.out_features == 1000
    assert meta("small14", width=1e-4).features.conv1.out_channels == 1


def test_prelu_parameter_counts():
    shared = meta("small14", activation="prelu-shared")
    assert sum(a.numel() for a in shared.prelu_coefficients().values()) == 13  # Table 1: 13 extra parameters
    assert list(shared.prelu_coefficients()) == [n for n, _ in shared.weight_layers()][:-1]
    wise = meta("small14", activation="prelu-channel-wise")
    assert sum(a.numel() for a in wise.prelu_coefficients().values()) == 64 + 4 * 128 + 6 * 256 + 2 * 4096
    assert meta("small14").prelu_coefficients() == {}
    assert meta("deep30", activation="prelu-shared").activation == "prelu-shared"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_prelu_init_and_following_prelu_init(activation):
    model = small14(activation=activation, prelu_init=0.25, **TINY)
    for a in model.prelu_coefficients().values():
        assert a.dim() == 1 and torch.all(a == 0.25)
    layers = model.weight_layers()
    expected = 0.0 if activation == "relu" else 0.25
    assert all(m.following_prelu_init == expected for _, m in layers[:-1])
    assert getattr(layers[-1][1], "following_prelu_init", None) is None  # fc3: no activation after it
    other = small14(activation=activation, prelu_init=0.1, **TINY)
    if activation != "relu":
        assert other.features.conv1.following_prelu_init == 0.1
        assert torch.all(other.prelu_coefficients()["fc2"] == 0.1)


@pytest.mark.parametrize("kind", ["prelu-shared", "prelu-channel-wise"])
def test_prelu_gradient_eq3(kind):
    """Eq. 3: dE/da = sum over positions of dE/df(y) * (0 if y > 0 else y); shared sums over channels too."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).double()
    prelu = make_activation(kind, 4).double()
    y = conv(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    f = prelu(y)
    dE_df = torch.randn_like(f)
    f.backward(dE_df)
    by_hand = (dE_df * torch.where(y > 0, 0.0, y)).detach().sum(dim=(0, 2, 3))  # one per channel
    if kind == "prelu-shared":
        by_hand = by_hand.sum(0, keepdim=True)
    assert prelu.weight.grad.shape == by_hand.shape
    torch.testing.assert_close(prelu.weight.grad, by_hand)


def test_build_model_errors():
    for kwargs, param, value, allowed in [
        (dict(name="vgg19"), "model", "vgg19", MODELS),
        (dict(name="small14", activation="leaky"), "activation", "leaky", ACTIVATIONS),
        (dict(name="model_a", stem="cifar"), "stem", "cifar", ("imagenet", "small")),
    ]:
        with pytest.raises(ValueError) as error:
            build_model(**kwargs)
        message = str(error.value)
        assert param in message and repr(value) in message and all(repr(a) in message for a in allowed)


def test_spp():
    spp = SPP((6, 3, 2, 1))
    assert spp.bins == 50
    assert spp(torch.randn(2, 5, 18, 18)).shape == (2, 250)
    assert spp(torch.randn(2, 5, 4, 4)).shape == (2, 250)  # levels larger than the map still work
    x = torch.randn(1, 1, 4, 4)
    assert spp(x)[0, -1] == x.max()  # the 1x1 level is a global max


def test_2x2_padding_keeps_the_receptive_field_centred():
    """Four averaging 2x2 convs on an impulse: the response's centre of mass stays on the impulse
    because the padded side alternates (always padding one side would drift it by 2 pixels)."""
    convs = [PaddedConv2d(1, 1, 2, pad=(0, 1, 0, 1) if i % 2 else (1, 0, 1, 0), bias=False) for i in range(1, 5)]
    assert [c.pad for c in meta("small14").features if isinstance(c, PaddedConv2d)][:2] == [(0, 1, 0, 1), (1, 0, 1, 0)]
    x = torch.zeros(1, 1, 17, 17)
    x[0, 0, 8, 8] = 1.0
    with torch.no_grad():
        for c in convs:
            c.weight.fill_(0.25)
            x = c(x)
    assert x.shape[-2:] == (17, 17)
    rows = (x[0, 0].sum(1) * torch.arange(17.0)).sum() / x.sum()
    cols = (x[0, 0].sum(0) * torch.arange(17.0)).sum() / x.sum()
    assert rows.item() == pytest.approx(8.0) and cols.item() == pytest.approx(8.0)


@pytest.mark.parametrize("name", ["small14", "model_b"])
def test_channels_last_bf16_autocast(name):
    torch.manual_seed(0)
    model = build_model(name, activation="prelu-channel-wise", **TINY).to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 28, 28).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().logsumexp(1).sum().backward()
    assert y.shape == (4, 10) and torch.isfinite(y.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
