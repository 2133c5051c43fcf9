"""Measure the per-layer signal variances that ``delving.theory`` predicts (Sec. 2.2, Eq. 7-15).

For each Conv2d/Linear layer l (in execution order) the probe records Var[y_l], the layer's
output before its activation, and Var[Delta x_l], the gradient with respect to the layer's input.
The backward signal is (out * g).sum() with g ~ N(0, 1) i.i.d., so Delta x_{L+1} = g.
Variances are computed in float64 whatever the model's dtype: a float32 signal of std 1e-23
(fixed std 0.01 after 30 layers) is representable, but its variance 1e-46 is not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from delving.init import WEIGHT_LAYERS
from delving.theory import LayerSpec, backward_ratios, forward_ratios

ACTIVATIONS = ("relu", "prelu", "linear")


def _activation(activation: str, a: float) -> tuple[nn.Module, float]:
    """The module and the coefficient it has at init, a = 0 ReLU, a = 1 linear (Eq. 15's a)."""
    if activation == "relu":
        return nn.ReLU(), 0.0
    if activation == "prelu":
        return nn.PReLU(init=a), a  # one shared a: at init channel-wise is the same function
    if activation == "linear":
        return nn.Identity(), 1.0
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _stack(layers: Sequence[nn.Module], activation: str, a: float) -> nn.Sequential:
    """layer, act, layer, act, ..., layer: every layer but the last is followed by the activation."""
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        modules.append(layer)
        if i < len(layers) - 1:
            act, layer.following_prelu_init = _activation(activation, a)
            modules.append(act)
        else:
            layer.following_prelu_init = None
    return nn.Sequential(*modules)


def deep_mlp(depth: int, width: int, activation: str = "relu", a: float = 0.25) -> nn.Sequential:
    """``depth`` width x width Linear layers, each but the last followed by ``activation``."""
    return _stack([nn.Linear(width, width) for _ in range(depth)], activation, a)


def conv_stack(depth: int, width: int, kernel_size: int = 3, activation: str = "relu", a: float = 0.25,
               padding_mode: str = "circular") -> nn.Sequential:
    """``depth`` same-size width -> width convs, no pooling: the pure Eq. 7-15 setting.

    Circular padding gives every output exactly n = k^2 c inputs and every input exactly
    n^ = k^2 d outputs; zero padding would starve the borders and bias deep stacks low.
    """
    convs = [nn.Conv2d(width, width, kernel_size, padding="same", padding_mode=padding_mode) for _ in range(depth)]
    return _stack(convs, activation, a)


def _execution_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, feeds the output directly) for each weight layer, in the order the forward pass runs them."""
    names = {module: name for name, module in model.named_modules()}
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: calls.append((m, out)))
             for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return [(names[m], m, y is out) for m, y in calls]


def layer_specs(model: nn.Module, input_shape: Sequence[int], *,
                following_prelu_init: Mapping[str, float | None] | None = None) -> list[LayerSpec]:
    """The model's Conv2d/Linear layers as theory ``LayerSpec``s, in execution order.

    ``a`` of each layer: None if its output is the model's output (nothing follows), else the
    value in ``following_prelu_init`` (by module name), else its ``following_prelu_init``
    attribute, where None or absent means ReLU (a = 0), as in ``delving.init.init_model``.
    """
    following_prelu_init = following_prelu_init or {}
    device = next(model.parameters()).device
    specs = []
    for name, module, is_output in _execution_order(model, torch.zeros(1, *input_shape, device=device)):
        a = following_prelu_init.get(name, getattr(module, "following_prelu_init", None))
        a = None if is_output else (a or 0.0)
        if isinstance(module, nn.Linear):
            specs.append(LayerSpec.fc(module.in_features, module.out_features, a))
        else:
            k, k_w = module.kernel_size
            if k != k_w:
                raise ValueError(f"layer {name!r}: theory needs square kernels, got {module.kernel_size}")
            specs.append(LayerSpec.conv(k, module.in_channels, module.out_channels, a))
    return specs


def _measure(model: nn.Module, input_shape: Sequence[int], batches: int, batch_size: int,
             data_rng: torch.Generator) -> tuple[list[tuple[str, nn.Module, bool]], list[float], list[float], float]:
    """One weight draw: per-layer Var[y_l] and Var[Delta x_l], and Var[g], each averaged over batches."""
    device = data_rng.device
    order = _execution_order(model, torch.zeros(1, *input_shape, device=device))
    index = {module: i for i, (_, module, _) in enumerate(order)}
    forward_var, backward_var, output_grad_var = [0.0] * len(order), [0.0] * len(order), 0.0

    def add_backward(i: int, grad: torch.Tensor) -> None:
        backward_var[i] += grad.double().var().item() / batches

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        i = index[module]
        forward_var[i] += output.detach().double().var().item() / batches
        inputs[0].register_hook(functools.partial(add_backward, i))  # fires with Delta x_l

    hooks = [module.register_forward_hook(record) for module in index]
    try:
        for _ in range(batches):
            x = torch.randn(batch_size, *input_shape, generator=data_rng, device=device, requires_grad=True)
            out = model(x)
            g = torch.randn(out.shape, generator=data_rng, device=device)
            (out * g).sum().backward()  # d loss / d out = g: i.i.d. N(0, 1)
            output_grad_var += g.var().item() / batches
    finally:
        for hook in hooks:
            hook.remove()
    return order, forward_var, backward_var, output_grad_var


def variance_profile(model_fn: Callable[[], nn.Module], init_fn: Callable[[nn.Module], object],
                     input_shape: Sequence[int], *, draws: int = 4, batches: int = 2, batch_size: int = 64,
                     seed: int = 0, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Measured Var[y_l] and Var[Delta x_l] of every Conv2d/Linear layer, one row per (draw, layer).

    Each draw builds ``model_fn()`` and initialises it with ``init_fn(model)`` (after
    ``torch.manual_seed(seed + draw)``, for inits that use the global RNG), then averages the
    variances over ``batches`` batches of N(0, 1) input of shape (batch_size, *input_shape).
    The model runs in eval mode (no dropout) and only input gradients are computed.
    Columns: draw, layer (0-based execution index), name, forward_var, backward_var,
    output_grad_var (Var[g] = Var[Delta x_{L+1}], the backward reference).
    """
    data_rng = torch.Generator(device=device).manual_seed(seed)  # inputs independent of the init's draws
    rows = []
    for draw in range(draws):
        torch.manual_seed(seed + draw)
        model = model_fn().to(device)
        init_fn(model)
        model.eval().requires_grad_(False)
        order, forward_var, backward_var, output_grad_var = _measure(model, input_shape, batches, batch_size,
                                                                     data_rng)
        rows += [dict(draw=draw, layer=i, name=name, forward_var=forward_var[i], backward_var=backward_var[i],
                      output_grad_var=output_grad_var) for i, (name, _, _) in enumerate(order)]
    return pd.DataFrame(rows)


def summarize(profile: pd.DataFrame) -> pd.DataFrame:
    """Per layer, the ratios that theory predicts, pooled over draws, and their per-draw spread.

    forward_ratio = Var[y_l] / Var[y_1] (as ``theory.forward_ratios``);
    backward_ratio = Var[Delta x_l] / Var[Delta x_{L+1}] (as ``theory.backward_ratios``).
    The pooled ratio divides means over draws: the paper's Var is over the weights too. The
    per-draw ratio is roughly log-normal (each layer multiplies it by a factor of relative variance
    ~5/width for ReLU fc layers), so its median (``*_median``) sits below the pooled ratio in deep,
    thin nets; ``*_min`` / ``*_max`` give the spread over draws.
    """
    means = profile.groupby(["layer", "name"], sort=True)[["forward_var", "backward_var", "output_grad_var"]].mean()
    pooled = pd.DataFrame({"forward_ratio": means.forward_var / means.forward_var.iloc[0],
                           "backward_ratio": means.backward_var / means.output_grad_var})
    first = profile[profile.layer == 0].set_index("draw").forward_var
    per_draw = profile.assign(forward_ratio=profile.forward_var / profile.draw.map(first),
                              backward_ratio=profile.backward_var / profile.output_grad_var)
    spread = per_draw.groupby(["layer", "name"], sort=True)[["forward_ratio", "backward_ratio"]].agg(
        ["median", "min", "max"])
    spread.columns = [f"{column}_{stat}" for column, stat in spread.columns]
    return pooled.join(spread).reset_index()


def with_theory(summary: pd.DataFrame, layers: Sequence[LayerSpec], scheme: str, *, std: float = 0.01,
                prelu_aware: bool = False) -> pd.DataFrame:
    """``summary`` plus predicted ratios and measured / predicted columns for one init scheme."""
    if len(layers) != len(summary):
        raise ValueError(f"{len(layers)} layer specs for {len(summary)} measured layers")
    forward = forward_ratios(layers, scheme, std=std, prelu_aware=prelu_aware)
    backward = backward_ratios(layers, scheme, std=std, prelu_aware=prelu_aware)
    return summary.assign(forward_theory=forward, backward_theory=backward,
                          forward_measured_over_theory=summary.forward_ratio / forward,
                          backward_measured_over_theory=summary.backward_ratio / backward)
