"""Closed-form signal-variance predictions of He et al. (2015), Sec. 2.2 (Eq. 7-15).

Conventions. Layers are numbered l = 1..L in forward order (list index l - 1).
y_l = W_l x_l is layer l's response (bias 0), x_{l+1} = f_l(y_l) with f_l the activation that
follows layer l: a PReLU of initial coefficient ``a`` (0 = ReLU, 1 = linear), or nothing (None).
For zero-mean symmetric y, E[f(y)^2] = (1 + a^2)/2 Var[y] and E[f'(y)^2] = (1 + a^2)/2
(``activation_gain``); "nothing follows" has gain 1, the same as a = 1.

Backward: Delta x_l = dE/dx_l, Delta y_l = f_l'(y_l) Delta x_{l+1}, and Delta x_{L+1} is the
gradient with respect to the model's output x_{L+1} = f_L(y_L) (= y_L when nothing follows).
Biases are taken as 0, so for "pytorch" (which keeps torch's bias) the bias term is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from delving.init import HE_SCHEMES, SCHEMES, he_mode

VGG_B_FILTERS = (64, 64, 128, 128, 256, 256, 512, 512, 512, 512)  # VGG "model B": 10 3x3 convs


@dataclass(frozen=True)
class LayerSpec:
    """One Conv2d/Linear layer: kernel k (1 for fc), c inputs, d outputs, ``a`` of the activation after it."""

    kind: str  # "conv" | "fc"
    k: int
    c: int
    d: int
    a: float | None = 0.0  # 0 = ReLU, 1 = linear, None = no activation follows (e.g. the last layer)

    def __post_init__(self):
        if self.kind not in ("conv", "fc"):
            raise ValueError(f"kind must be 'conv' or 'fc', got {self.kind!r}")
        if self.kind == "fc" and self.k != 1:
            raise ValueError(f"an fc layer has k = 1, got k={self.k}")

    @classmethod
    def conv(cls, k: int, c: int, d: int, a: float | None = 0.0) -> LayerSpec:
        return cls("conv", k, c, d, a)

    @classmethod
    def fc(cls, c: int, d: int, a: float | None = 0.0) -> LayerSpec:
        return cls("fc", 1, c, d, a)

    @property
    def n(self) -> int:
        """Fan-in n_l = k^2 c (Eq. 7)."""
        return self.k * self.k * self.c

    @property
    def n_hat(self) -> int:
        """Fan-out n^_l = k^2 d (Eq. 11)."""
        return self.k * self.k * self.d


def activation_gain(a: float | None) -> float:
    """E[f(y)^2] / Var[y] = E[f'(y)^2] = (1 + a^2) / 2 for PReLU(a) (Eq. 8, 15); 1 if no activation."""
    return 1.0 if a is None else (1.0 + a * a) / 2.0


def weight_variance(spec: LayerSpec, scheme: str, *, std: float = 0.01, prelu_aware: bool = False) -> float:
    """Var[w_l] that ``delving.init.init_model(scheme, std=, prelu_aware=)`` draws for this layer."""
    if scheme in HE_SCHEMES:
        a = (spec.a or 0.0) if prelu_aware else 0.0  # init treats "no activation" as ReLU, like the paper
        fan = spec.n if he_mode(scheme, is_conv=spec.kind == "conv") == "fan_in" else spec.n_hat
        return 2.0 / ((1.0 + a * a) * fan)  # Eq. 10/14/15
    if scheme == "xavier":
        return 1.0 / spec.n
    if scheme == "glorot":
        return 2.0 / (spec.n + spec.n_hat)
    if scheme == "fixed":
        return std * std
    if scheme == "pytorch":
        return 1.0 / (3.0 * spec.n)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def forward_ratios(layers: Sequence[LayerSpec], scheme: str, *, std: float = 0.01,
                   prelu_aware: bool = False) -> list[float]:
    """Predicted Var[y_l] / Var[y_1] for l = 1..L (index 0 is 1.0).

    Eq. 7 with E[x_l^2] = gain(a_{l-1}) Var[y_{l-1}] (Eq. 8, 15), multiplied out as in Eq. 9:
    Var[y_l] = Var[y_{l-1}] n_l Var[w_l] (1 + a_{l-1}^2) / 2.
    """
    ratios = [1.0]
    for previous, layer in zip(layers, layers[1:]):
        factor = layer.n * weight_variance(layer, scheme, std=std, prelu_aware=prelu_aware)
        ratios.append(ratios[-1] * factor * activation_gain(previous.a))
    return ratios


def backward_ratios(layers: Sequence[LayerSpec], scheme: str, *, std: float = 0.01,
                    prelu_aware: bool = False) -> list[float]:
    """Predicted Var[Delta x_l] / Var[Delta x_{L+1}] for l = 1..L (index l - 1).

    The reference Delta x_{L+1} is the gradient at the model's output, so the last entry is
    layer L's own factor, not 1. Eq. 12 with the activation that follows layer l (Eq. 15):
    Var[Delta x_l] = Var[Delta x_{l+1}] n^_l Var[w_l] (1 + a_l^2) / 2; the product is Eq. 13.
    """
    ratios = [1.0]
    for layer in reversed(layers):
        factor = layer.n_hat * weight_variance(layer, scheme, std=std, prelu_aware=prelu_aware)
        ratios.append(ratios[-1] * factor * activation_gain(layer.a))
    return ratios[:0:-1]  # drop the reference, back to forward order


def xavier_factor(num_layers: int) -> float:
    """Std of the signal after ``num_layers`` ReLU layers under the paper's Xavier, relative to He's: (1/sqrt 2)^L."""
    return (1.0 / math.sqrt(2.0)) ** num_layers


def weight_layer_specs(model) -> list[LayerSpec]:
    """The LayerSpecs of a `delving.models` network's weight layers, input to output (activations
    left at ReLU's a = 0; build it on the meta device to read shapes without drawing weights)."""
    from torch import nn

    return [LayerSpec.conv(m.kernel_size[0], m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d)
            else LayerSpec.fc(m.in_features, m.out_features) for _, m in model.weight_layers()]


def fan_out_only_forward_product(layers: Sequence[LayerSpec]) -> float:
    """Var[y_L] / Var[y_1] of a ReLU net initialised by Eq. 14 alone: prod_{l=2..L} n_l / n^_l.

    Since c_{l+1} = d_l (and n_l / n^_l = c_l / d_l for any k) the product telescopes to c_2 / d_L.
    """
    return math.prod(layer.n / layer.n_hat for layer in layers[1:])


def vgg_b_layers(in_channels: int = 3, filters: Sequence[int] = VGG_B_FILTERS, k: int = 3) -> list[LayerSpec]:
    """VGG model B's conv layers (all 3x3, each followed by a ReLU), pooling ignored as in Sec. 2.2."""
    channels = [in_channels, *filters]
    return [LayerSpec.conv(k, c, d) for c, d in zip(channels, channels[1:])]


def vgg_fixed_std_gradient_ratio(std: float = 0.01, layers: Sequence[LayerSpec] | None = None,
                                 down_to: int = 2) -> float:
    """Std of Delta x_{down_to} under fixed-std init over that under Eq. 14 (Sec. 2.2: 1/(1.7e4)).

    Eq. 13 from the top conv down to layer ``down_to``; every factor is (std / std_Eq14)^2.
    """
    layers = vgg_b_layers() if layers is None else layers
    fixed = backward_ratios(layers, "fixed", std=std)[down_to - 1]
    derived = backward_ratios(layers, "he-fan-out")[down_to - 1]
    return math.sqrt(fixed / derived)
