"""Weight initialisers of He et al. (2015), Sec. 2.2, and the baselines they are compared with.

Notation (paper, Sec. 2.2): a layer's weight W is d x n with n = k^2 c (fan-in) and
n^ = k^2 d (fan-out), k the kernel size (1 for fc), c input and d output channels.
All ``*_`` functions fill a Conv2d/Linear weight tensor in place and return it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
SCHEMES = ("he-fan-in", "he-fan-out", "he-fan-out-conv", "xavier", "glorot", "fixed", "pytorch")
# "he-fan-out-conv": Eq. 14 on the conv layers, Eq. 10 on the fully connected ones. Sec. 2.2 derives
# both forms for conv layers, where the product of n_l / n^_l telescopes to c_2 / d_L; in the fc
# layers after SPP it does not (fc1's fan-in is bins x channels, fc3's fan-out the classes).
HE_SCHEMES = ("he-fan-in", "he-fan-out", "he-fan-out-conv")
MODES = ("fan_in", "fan_out")


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """(n, n^) = (k^2 c, k^2 d) of a Conv2d weight (d, c, k, k) or Linear weight (d, c)."""
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (d, c, ...), got shape {tuple(weight.shape)}")
    receptive_field = math.prod(weight.shape[2:])  # k^2 for conv, 1 for fc
    return weight.shape[1] * receptive_field, weight.shape[0] * receptive_field


def _fan(weight: torch.Tensor, mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fan_in, fan_out = fans(weight)
    return fan_in if mode == "fan_in" else fan_out


def he_normal_(weight: torch.Tensor, mode: str = "fan_in", a: float = 0.0, *,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """He init: N(0, std = sqrt(2 / ((1 + a^2) n))).

    mode="fan_in" keeps the forward signal (Eq. 10, n = k^2 c); mode="fan_out" keeps the
    backward signal (Eq. 14, n^ = k^2 d). ``a`` is the initial PReLU coefficient of the
    rectifier (Eq. 15): a = 0 is ReLU, a = 1 is linear and reduces to ``xavier_normal_``.
    """
    std = math.sqrt(2.0 / ((1.0 + a * a) * _fan(weight, mode)))
    with torch.no_grad():
        return weight.normal_(0.0, std, generator=generator)


def xavier_normal_(weight: torch.Tensor, mode: str = "fan_in", *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's "Xavier": n Var[w] = 1, i.e. N(0, std = sqrt(1 / n)) (Sec. 2.2, "Comparisons").

    Not torch.nn.init.xavier_normal_, which averages fan-in and fan-out (see ``glorot_uniform_``).
    """
    std = math.sqrt(1.0 / _fan(weight, mode))
    with torch.no_grad():
        return weight.normal_(0.0, std, generator=generator)


def glorot_uniform_(weight: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Glorot & Bengio's original: U(-b, b), b = sqrt(6 / (n + n^)), so Var[w] = 2 / (n + n^)."""
    fan_in, fan_out = fans(weight)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound, generator=generator)


def fixed_normal_(weight: torch.Tensor, std: float = 0.01, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, std) regardless of shape: the fixed-std init that stalls deep VGG-like nets (Sec. 2.2)."""
    with torch.no_grad():
        return weight.normal_(0.0, std, generator=generator)


def pytorch_default_(module: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    """PyTorch's own Conv/Linear init: kaiming_uniform_(a=sqrt(5)), so Var[w] = 1 / (3 n); bias U(+-1/sqrt(n)).

    Without a generator this is ``module.reset_parameters()``; with one, the same two draws are
    replayed from that generator (reset_parameters() only takes the global RNG).
    """
    if generator is None:
        module.reset_parameters()
        return module
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    if module.bias is not None:
        bound = 1.0 / math.sqrt(fans(module.weight)[0])
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return module


def he_mode(scheme: str, *, is_conv: bool) -> str:
    """The fan ("fan_in" or "fan_out") a He scheme normalises for a conv or an fc layer."""
    if scheme == "he-fan-out-conv":
        return "fan_out" if is_conv else "fan_in"
    return "fan_in" if scheme == "he-fan-in" else "fan_out"


def init_model(model: nn.Module, scheme: str, *, std: float = 0.01, prelu_aware: bool = False,
               following_prelu_init: Mapping[str, float | None] | None = None,
               generator: torch.Generator | None = None) -> nn.Module:
    """Initialise every Conv2d and Linear of ``model`` with one scheme, in place; returns ``model``.

    Biases are zeroed (the paper's b = 0 of Eq. 8) except for "pytorch", which keeps torch's own
    bias. With ``prelu_aware`` the He schemes use Eq. 15 with ``a`` the initial coefficient of the
    activation that *follows* each layer, looked up by qualified module name in
    ``following_prelu_init`` or else in the layer's ``following_prelu_init`` attribute;
    None or absent means ReLU (a = 0). ("xavier" uses fan-in; call ``xavier_normal_`` for fan-out.)
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    following_prelu_init = following_prelu_init or {}
    for name, module in model.named_modules():
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        if scheme == "pytorch":
            pytorch_default_(module, generator=generator)
            continue
        w = module.weight
        if scheme in HE_SCHEMES:
            a = following_prelu_init.get(name, getattr(module, "following_prelu_init", None))
            a = (a or 0.0) if prelu_aware else 0.0
            he_normal_(w, he_mode(scheme, is_conv=isinstance(module, nn.Conv2d)), a, generator=generator)
        elif scheme == "xavier":
            xavier_normal_(w, generator=generator)
        elif scheme == "glorot":
            glorot_uniform_(w, generator=generator)
        else:  # "fixed"
            fixed_normal_(w, std, generator=generator)
        if module.bias is not None:
            with torch.no_grad():
                module.bias.zero_()
    return model
