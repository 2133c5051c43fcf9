"""The plain (no BatchNorm, no LRN) networks of He, Zhang, Ren & Sun 2015, "Delving Deep into
Rectifiers", with ReLU or PReLU (Sec. 2.1) after every conv layer and after fc1, fc2.

    small14   Table 1: the 14-layer small model (model E of He & Sun 2014), Table 2 / Sec. 2.1
    deep30    Fig. 3: the 14-layer model plus 16 extra 2x2, 256-filter convs in stage 3
    model_a   Table 3: 19 layers, 1.90e10 multiply-adds at 224 (Tables 4-6)
    model_b   Table 3: 22 layers, 2.32e10 (also the 22-layer model of Fig. 2)
    model_c   Table 3: 22 layers, 5.30e10

Layer names (`PlainNet.weight_layers()`, `prelu_coefficients()`, the module names themselves):
"conv1"; then "conv{stage}{index}" with a one-digit stage and a 1-based index within the stage,
stages numbered from 2 as in Table 1 ("conv21".."conv24", "conv31".."conv36"; deep30 continues
"conv37".."conv322"; model A has "conv21".."conv25", "conv31".."conv35", "conv41".."conv45");
then "fc1", "fc2", "fc3". The activation after layer X is the module "X_act", dropout "X_drop",
the max-pool after stage s is "pool{s}" (pool1 follows conv1).

Each Conv2d/Linear followed by an activation carries `following_prelu_init` (float: the initial
PReLU coefficient a, 0.0 for ReLU) so `delving.init` can apply Eq. 15, (1 + a^2) n Var[w] / 2 = 1.
The last fc has no such attribute. Biases are kept (Caffe's default); weights keep PyTorch's
default init until `delving.init` overwrites them.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("relu", "prelu-shared", "prelu-channel-wise")
STEMS = ("imagenet", "small")
SMALL_STEM_BELOW = 64  # stem=None picks "small" for inputs smaller than this


def _check(param, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {param}={value!r}; allowed values: {', '.join(map(repr, allowed))}")


def make_activation(kind, channels, prelu_init=0.25):
    """ReLU, or PReLU (Eq. 1) with one a per layer ("prelu-shared", Table 1: 13 extra parameters
    for the 14-layer model) or one a per channel ("prelu-channel-wise"); a starts at 0.25 (Sec. 2.1)."""
    _check("activation", kind, ACTIVATIONS)
    if kind == "relu":
        return nn.ReLU()  # not in-place: hooks that keep a layer's response must see it unrectified
    return nn.PReLU(num_parameters=1 if kind == "prelu-shared" else channels, init=prelu_init)


class PaddedConv2d(nn.Conv2d):
    """A Conv2d that zero-pads its input by `pad` = (left, right, top, bottom) first.

    Table 1's 2x2 convs keep the map size (stage 2 stays ~36, stage 3 ~18) but padding is not
    stated; a 2x2 kernel needs one pixel of padding on one side only, and padding the same side
    every layer would shift the receptive field half a pixel per layer. `_conv2x2` alternates the
    side so consecutive pairs cancel (torch's padding="same" always pads right/bottom)."""

    def __init__(self, *args, pad, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = tuple(pad)

    def forward(self, x):
        return super().forward(F.pad(x, self.pad))

    def extra_repr(self):
        return super().extra_repr() + f", pad={self.pad}"


def _conv2x2(c_in, c_out, index):
    # odd index (conv21, conv23, ...): pad right/bottom, output centre moves +1/2 pixel;
    # even index: pad left/top, moves it back. Stages of 4, 6 and 22 layers end centred.
    return PaddedConv2d(c_in, c_out, 2, pad=(0, 1, 0, 1) if index % 2 else (1, 0, 1, 0))


class SPP(nn.Module):
    """Spatial pyramid pooling (He et al. 2014): adaptive max-pool to n x n for each level n,
    flatten and concatenate, so fc1 sees channels * sum(n^2) numbers whatever the map size.
    Levels larger than the map (e.g. 7 on a 4x4 map at 28x28 input) repeat pixels; harmless."""

    def __init__(self, levels):
        super().__init__()
        self.levels = tuple(levels)

    @property
    def bins(self):
        return sum(n * n for n in self.levels)

    def forward(self, x):
        return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in self.levels], dim=1)

    def extra_repr(self):
        return f"levels={self.levels}"


class PlainNet(nn.Module):
    """features (convs, activations, pools) -> SPP -> classifier (fc1, fc2 with activation and
    dropout, then fc3). Built by the functions below; see the module docstring for names."""

    def __init__(self, features, spp_levels, classifier, *, activation, input_size, in_channels, stem):
        super().__init__()
        self.features = nn.Sequential(features)
        self.spp = SPP(spp_levels)
        self.classifier = nn.Sequential(classifier)
        self.activation, self.input_size, self.in_channels, self.stem = activation, input_size, in_channels, stem

    def forward(self, x):
        return self.classifier(self.spp(self.features(x)))

    def _named(self):
        yield from self.features.named_children()
        yield from self.classifier.named_children()

    def weight_layers(self):
        """[(name, module)] of every Conv2d / Linear, input to output, with the paper's names."""
        return [(n, m) for n, m in self._named() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def prelu_coefficients(self):
        """{layer name: 1-D tensor of the a's of the PReLU after it} (Table 1's columns); {} for ReLU."""
        return {n.removesuffix("_act"): m.weight.detach() for n, m in self._named() if isinstance(m, nn.PReLU)}


def _resolve_stem(stem, input_size):
    if stem is None:
        return "small" if input_size < SMALL_STEM_BELOW else "imagenet"
    _check("stem", stem, STEMS)
    return stem


def _plain_net(conv1_filters, pool1, stages, spp_levels, ceil_stage_pools, *, activation, num_classes,
               in_channels, input_size, width, prelu_init, dropout, stem):
    """conv1 -> pool1 -> stage 2 -> pool2 -> stage 3 [-> pool3 -> stage 4] -> spp -> fc1, fc2, fc3.
    `stages` is a list of (kernel, [filters of each conv]); kernel 2 means Table 1's padded 2x2."""
    _check("activation", activation, ACTIVATIONS)
    stem = _resolve_stem(stem, input_size)
    scaled = lambda c: max(1, round(c * width))
    a0 = 0.0 if activation == "relu" else float(prelu_init)

    def add(layers, name, layer, channels):  # a weight layer and the activation after it
        layer.following_prelu_init = a0
        layers[name] = layer
        layers[name + "_act"] = make_activation(activation, channels, prelu_init)

    features, c = OrderedDict(), scaled(conv1_filters)
    k, s, p = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
    add(features, "conv1", nn.Conv2d(in_channels, c, k, s, p), c)
    features["pool1"] = nn.MaxPool2d(*(pool1 if stem == "imagenet" else (2, 2)))
    for stage, (kernel, filters) in enumerate(stages, start=2):
        if stage > 2:
            features[f"pool{stage - 1}"] = nn.MaxPool2d(2, 2, ceil_mode=ceil_stage_pools)
        for i, f in enumerate(filters, start=1):
            conv = _conv2x2(c, scaled(f), i) if kernel == 2 else nn.Conv2d(c, scaled(f), 3, padding=1)
            c = scaled(f)
            add(features, f"conv{stage}{i}", conv, c)

    classifier, n = OrderedDict(), c * sum(level * level for level in spp_levels)
    for name in ("fc1", "fc2"):
        add(classifier, name, nn.Linear(n, scaled(4096)), scaled(4096))
        classifier[name + "_drop"] = nn.Dropout(dropout)  # Sec. 3: 50 % dropout on fc1 and fc2
        n = scaled(4096)
    classifier["fc3"] = nn.Linear(n, num_classes)
    return PlainNet(features, spp_levels, classifier, activation=activation, input_size=input_size,
                    in_channels=in_channels, stem=stem)


def _table1(extra_layers, activation, num_classes, in_channels, input_size, width, prelu_init, dropout, stem):
    return _plain_net(64, (3, 3), [(2, [128] * 4), (2, [256] * (6 + extra_layers))], (6, 3, 2, 1), False,
                      activation=activation, num_classes=num_classes, in_channels=in_channels,
                      input_size=input_size, width=width, prelu_init=prelu_init, dropout=dropout, stem=stem)


def small14(activation="relu", num_classes=1000, in_channels=3, input_size=224, width=1.0,
            prelu_init=0.25, dropout=0.5, stem=None):
    """Table 1, the 14-layer model (11 conv + 3 fc), 224x224 input:
    conv1 7x7, 64, stride 2 (pad 3) -> pool1 3x3/3 -> conv21-24 2x2, 128 -> pool2 2x2/2 ->
    conv31-36 2x2, 256 -> spp {6, 3, 2, 1} -> fc1 4096, fc2 4096, fc3 num_classes.
    At 224: conv1 112, stage 2 at 37x37, stage 3 at 18x18 (paper: "about 36" and "about 18";
    pad 3 on conv1 matches Table 3's stems, which need it to reach 56).

    width scales every conv and fc1/fc2 (round, at least 1), for CPU-sized runs.

    stem="small" (the default when input_size < 64, e.g. 1x28x28 Fashion-MNIST): conv1 becomes
    3x3, stride 1, pad 1 (same filters) and pool1 2x2/2. A 7x7/2 conv and a 3x3/3 pool would turn
    28x28 into 4x4 before stage 2, leaving the 2x2 convs and the pyramid almost nothing to see;
    the small stem keeps every layer, the depth and the two-stage layout (stage 2 at 14x14,
    stage 3 at 7x7 for 28x28), which is what the paper's comparisons (ReLU vs PReLU, init at
    depth) depend on. Everything else is unchanged."""
    return _table1(0, activation, num_classes, in_channels, input_size, width, prelu_init, dropout, stem)


def deep30(extra_layers=16, activation="relu", num_classes=1000, in_channels=3, input_size=224, width=1.0,
           prelu_init=0.25, dropout=0.5, stem=None):
    """Fig. 3's 30-layer model (27 conv + 3 fc): small14 with `extra_layers` more 2x2, 256-filter
    convs appended to stage 3 ("conv37".."conv322" at the default 16), same padding rule and stem.
    The paper only says "up to sixteen extra conv layers of 256 2x2 filters"; stage 3 is the
    natural reading (the other layers of that width)."""
    return _table1(extra_layers, activation, num_classes, in_channels, input_size, width, prelu_init, dropout,
                   stem)


def _table3(convs_per_stage, widths, activation, num_classes, in_channels, input_size, width, prelu_init,
            dropout, stem):
    """Table 3: conv1 7x7, 96, stride 2 (pad 3) -> 2x2/2 max-pool -> three stages of 3x3 convs
    (pad 1) at 56, 28, 14 with a 2x2/2 max-pool between them -> spp {7, 3, 2, 1} (63 bins) ->
    fc 4096, 4096, num_classes. The stage pools use ceil_mode: at 224 every size is even, so this
    changes nothing, and with the small stem at 28x28 stage 4 sees 4x4 rather than 3x3 (stages at
    14, 7, 4). The small stem (conv1 3x3/1, stem pool 2x2/2) is as in `small14`."""
    return _plain_net(96, (2, 2), [(3, [w] * convs_per_stage) for w in widths], (7, 3, 2, 1), True,
                      activation=activation, num_classes=num_classes, in_channels=in_channels,
                      input_size=input_size, width=width, prelu_init=prelu_init, dropout=dropout, stem=stem)


def model_a(activation="relu", num_classes=1000, in_channels=3, input_size=224, width=1.0, prelu_init=0.25,
            dropout=0.5, stem=None):
    """Table 3 model A: 5 convs a stage, 256/512/512 filters, 19 weight layers, 1.90e10 FLOPs."""
    return _table3(5, (256, 512, 512), activation, num_classes, in_channels, input_size, width, prelu_init,
                   dropout, stem)


def model_b(activation="relu", num_classes=1000, in_channels=3, input_size=224, width=1.0, prelu_init=0.25,
            dropout=0.5, stem=None):
    """Table 3 model B (and Fig. 2's 22-layer model): 6 convs a stage, 256/512/512, 2.32e10 FLOPs."""
    return _table3(6, (256, 512, 512), activation, num_classes, in_channels, input_size, width, prelu_init,
                   dropout, stem)


def model_c(activation="relu", num_classes=1000, in_channels=3, input_size=224, width=1.0, prelu_init=0.25,
            dropout=0.5, stem=None):
    """Table 3 model C: 6 convs a stage, 384/768/896 filters, 22 weight layers, 5.30e10 FLOPs."""
    return _table3(6, (384, 768, 896), activation, num_classes, in_channels, input_size, width, prelu_init,
                   dropout, stem)


MODELS = {"small14": small14, "deep30": deep30, "model_a": model_a, "model_b": model_b, "model_c": model_c}


def build_model(name, **kwargs):
    """MODELS[name](**kwargs); unknown names, activations or stems raise ValueError listing the choices."""
    _check("model", name, tuple(MODELS))
    return MODELS[name](**kwargs)


def count_macs(model, input_size=None, in_channels=None):
    """Forward multiply-adds for one image, counted by forward hooks on every Conv2d and Linear.

    Convention (the paper's "FLOPs" in Table 3 are multiply-adds): a conv costs
    H_out * W_out * k^2 * c_in * c_out (/ groups), an fc in * out; biases, pooling, SPP and
    activations are ignored. Build the model under `torch.device("meta")` to count a full-size
    model without allocating it. input_size / in_channels default to the model's own."""
    input_size = input_size or model.input_size
    in_channels = in_channels or model.in_channels
    weight = next(model.parameters())
    x = torch.zeros(1, in_channels, input_size, input_size, device=weight.device, dtype=weight.dtype)
    macs = 0

    def hook(module, inputs, out):
        nonlocal macs
        positions = out.shape[-2] * out.shape[-1] if isinstance(module, nn.Conv2d) else out.numel() // out.shape[-1]
        macs += positions * module.weight.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs
