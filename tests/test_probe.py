"""delving.probe: exact bookkeeping on hand-built nets, then measured variances against Eq. 7-15."""

import functools

import pytest
import torch
from torch import nn

from delving.init import init_model
from delving.probe import conv_stack, deep_mlp, layer_specs, summarize, variance_profile, with_theory
from delving.theory import LayerSpec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The probe's tensors are small: on a shared 2-core box, 2 OpenMP threads make them ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_deep_mlp_and_conv_stack_specs():
    assert layer_specs(deep_mlp(3, 16, "prelu", a=0.25), (16,)) == [
        LayerSpec.fc(16, 16, 0.25), LayerSpec.fc(16, 16, 0.25), LayerSpec.fc(16, 16, None)]
    assert layer_specs(deep_mlp(2, 8, "linear"), (8,)) == [LayerSpec.fc(8, 8, 1.0), LayerSpec.fc(8, 8, None)]
    assert layer_specs(conv_stack(3, 8, 5, "relu"), (8, 6, 6)) == [
        LayerSpec.conv(5, 8, 8, 0.0), LayerSpec.conv(5, 8, 8, 0.0), LayerSpec.conv(5, 8, 8, None)]
    assert [type(m).__name__ for m in deep_mlp(2, 4, "prelu")] == ["Linear", "PReLU", "Linear"]
    with pytest.raises(ValueError, match="activation"):
        deep_mlp(2, 4, "tanh")


def test_conv_stack_keeps_spatial_size():
    assert conv_stack(4, 8, 3)(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5)
    assert conv_stack(2, 8, 2)(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5)  # even kernels too


class Reversed(nn.Module):
    """Layers registered in the opposite order to the one they run in; a head whose output is returned."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 4)
        self.body = nn.Conv2d(8, 32, 2)
        self.stem = nn.Conv2d(3, 8, 3)
        self.stem.following_prelu_init = 0.25

    def forward(self, x):
        x = torch.relu(self.body(nn.functional.prelu(self.stem(x), torch.tensor([0.25]))))
        return self.head(x.mean(dim=(2, 3)))


def test_layer_specs_follow_execution_order_and_activation_map():
    assert layer_specs(Reversed(), (3, 8, 8)) == [
        LayerSpec.conv(3, 3, 8, 0.25), LayerSpec.conv(2, 8, 32, 0.0), LayerSpec.fc(32, 4, None)]
    assert layer_specs(Reversed(), (3, 8, 8), following_prelu_init={"body": 0.5})[1] == LayerSpec.conv(2, 8, 32, 0.5)


def scaled_identity_chain():
    """y_1 = 2 x, y_2 = 3 y_1 (linear in between), so every variance ratio is exact."""
    layers = [nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)]
    for layer, scale in zip(layers, (2.0, 3.0)):
        nn.init.eye_(layer.weight)
        layer.weight.data.mul_(scale)
    return nn.Sequential(layers[0], nn.Identity(), layers[1])


def test_variance_profile_bookkeeping_is_exact():
    profile = variance_profile(scaled_identity_chain, lambda model: None, (8,), draws=3, batches=2, batch_size=16)
    assert list(profile.columns) == ["draw", "layer", "name", "forward_var", "backward_var", "output_grad_var"]
    assert len(profile) == 3 * 2 and list(profile.name[:2]) == ["0", "2"]
    by_layer = profile.pivot(index="draw", columns="layer")
    torch.testing.assert_close(torch.tensor(by_layer.forward_var[1] / by_layer.forward_var[0]),
                               torch.full((3,), 9.0, dtype=torch.float64))  # Var[3 y_1] = 9 Var[y_1]
    torch.testing.assert_close(torch.tensor(by_layer.backward_var[1] / by_layer.output_grad_var[1]),
                               torch.full((3,), 9.0, dtype=torch.float64))  # Delta x_2 = 3 g
    torch.testing.assert_close(torch.tensor(by_layer.backward_var[0] / by_layer.output_grad_var[0]),
                               torch.full((3,), 36.0, dtype=torch.float64))  # Delta x_1 = 2 * 3 g
    summary = summarize(profile)
    assert list(summary.forward_ratio) == pytest.approx([1.0, 9.0])
    assert list(summary.backward_ratio) == pytest.approx([36.0, 9.0])
    assert list(summary.forward_ratio_min) == pytest.approx([1.0, 9.0])


MLP = functools.partial(deep_mlp, 10, 256)
CASES = {  # name: model builder, input shape, scheme, prelu_aware, theory at (last layer fwd, first layer bwd)
    "mlp-he-fan-in": (MLP, (256,), "he-fan-in", False, (1.0, 2.0)),
    "mlp-he-fan-out": (MLP, (256,), "he-fan-out", False, (1.0, 2.0)),
    "mlp-xavier": (MLP, (256,), "xavier", False, (2.0 ** -9, 2.0 ** -9)),
    "mlp-prelu-aware": (functools.partial(MLP, "prelu", 0.25), (256,), "he-fan-in", True, (1.0625, None)),
    "mlp-prelu-unaware": (functools.partial(MLP, "prelu", 0.25), (256,), "he-fan-in", False, (1.0625 ** 9, None)),
    "mlp-prelu-aware-fan-out": (functools.partial(MLP, "prelu", 0.25), (256,), "he-fan-out", True, (None, 2.0)),
    "conv-he-fan-in": (functools.partial(conv_stack, 5, 64, 3), (64, 6, 6), "he-fan-in", False, (1.0, 2.0)),
    "conv-xavier": (functools.partial(conv_stack, 5, 64, 3), (64, 6, 6), "xavier", False, (2.0 ** -4, 2.0 ** -4)),
}


@pytest.mark.parametrize("case", CASES)
def test_measured_ratios_match_theory(case):
    model_fn, input_shape, scheme, prelu_aware, (forward_last, backward_first) = CASES[case]
    init_fn = functools.partial(init_model, scheme=scheme, prelu_aware=prelu_aware)
    profile = variance_profile(model_fn, init_fn, input_shape, draws=24, batches=1, batch_size=32, seed=1)
    summary = with_theory(summarize(profile), layer_specs(model_fn(), input_shape), scheme, prelu_aware=prelu_aware)
    # the closed forms the comparison rests on
    if forward_last is not None:
        assert summary.forward_theory.iloc[-1] == pytest.approx(forward_last)
    if backward_first is not None:
        assert summary.backward_theory.iloc[0] == pytest.approx(backward_first)
    # every layer within 25 %: the per-draw ratio is roughly log-normal, the pooled one is not far off
    assert summary.forward_measured_over_theory.between(0.75, 1.25).all(), summary.forward_measured_over_theory
    assert summary.backward_measured_over_theory.between(0.75, 1.25).all(), summary.backward_measured_over_theory
