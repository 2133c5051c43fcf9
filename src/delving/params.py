"""Notebook parameters: one declaration per chapter, one checker for all of them.

papermill injects parameters without checking their types or names, so every notebook hands
its namespace to `check` right after the parameters cell. `check` refuses, before any work
starts, a value of the wrong type, out of range or not among the choices, and a name the
notebook does not declare, with a message naming the parameter, the value given and what is
allowed. Profiles (`params/<profile>/<notebook>.yaml`, read by `papermill -f`) go through the
same checker (`check_profile`) before `make book` runs anything.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
PROFILES_DIR = PROJECT_ROOT / "params"


class ParameterError(ValueError):
    """A parameter value, name or profile that a notebook refuses."""


@dataclass(frozen=True)
class Param:
    """One notebook parameter: its type, what it means, and what values it allows.

    kind: "int", "float", "str", "bool", "str-list", "float-list" or "int-list".
    choices: allowed values (for lists: allowed items). low/high: inclusive bounds
    (for lists: on every item). nullable: None is allowed. is_dir: a str that must name an
    existing directory (when not None).
    """

    kind: str
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    nullable: bool = False
    is_dir: bool = False

    def allowed(self) -> str:
        parts = [{"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                  "str-list": "a list of strings", "float-list": "a list of numbers",
                  "int-list": "a list of integers"}[self.kind]]
        if self.choices is not None:
            parts.append(("each one of " if self.kind.endswith("list") else "one of ")
                         + ", ".join(repr(c) for c in self.choices))
        if self.low is not None and self.high is not None:
            parts.append(f"in [{self.low}, {self.high}]")
        elif self.low is not None:
            parts.append(f">= {self.low}")
        elif self.high is not None:
            parts.append(f"<= {self.high}")
        if self.is_dir:
            parts.append("naming an existing directory")
        if self.nullable:
            parts.append("or None")
        return ", ".join(parts)


def _is_scalar(value: Any, kind: str) -> bool:
    # bool is an int subclass in Python; a flag given where a count belongs is a mistake.
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    raise AssertionError(kind)


def check_value(name: str, value: Any, spec: Param, *, check_paths: bool = True) -> Any:
    """Return `value` (ints widened to float where a float is declared) or raise ParameterError.

    check_paths=False skips the existence check of directories (to validate, on this machine,
    a profile meant for another one)."""
    def refuse(why: str = "") -> ParameterError:
        return ParameterError(f"parameter {name!r}: got {value!r} ({type(value).__name__}); "
                              f"allowed: {spec.allowed()}{'; ' + why if why else ''}")

    if value is None:
        if spec.nullable:
            return None
        raise refuse()
    items, scalar_kind = ([value], spec.kind) if not spec.kind.endswith("-list") else (value, spec.kind[:-5])
    if spec.kind.endswith("-list") and not (isinstance(value, (list, tuple)) and len(value) > 0):
        raise refuse("a non-empty list is needed")
    for item in items:
        if not _is_scalar(item, scalar_kind):
            raise refuse()
        if spec.choices is not None and item not in spec.choices:
            raise refuse()
        if spec.low is not None and item < spec.low:
            raise refuse()
        if spec.high is not None and item > spec.high:
            raise refuse()
        if spec.is_dir and check_paths and not Path(item).expanduser().is_dir():
            raise refuse(f"{item!r} is not an existing directory")
    if scalar_kind == "float":
        return [float(v) for v in value] if spec.kind.endswith("-list") else float(value)
    return list(value) if spec.kind.endswith("-list") else value


# Names IPython itself puts in a notebook's namespace; anything else that is not a module,
# function or class was set by the parameters cell or injected by papermill.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def check(notebook: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Validate a notebook's parameters; return them as a dict, or raise ParameterError.

    `namespace` is the notebook's `globals()` right after the parameters (and papermill's
    injected-parameters) cell. A name the notebook does not declare is refused too, because
    papermill only warns about it and the run would silently ignore it.
    """
    spec = spec_for(notebook)
    given = {k: v for k, v in namespace.items()
             if not k.startswith("_") and k not in _IPYTHON_NAMES
             and not isinstance(v, (types.ModuleType, types.FunctionType, type, types.BuiltinFunctionType))}
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ParameterError(f"{notebook}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                             f"this notebook takes: {', '.join(spec)}")
    missing = [k for k in spec if k not in given]
    if missing:
        raise ParameterError(f"{notebook}: parameter(s) {', '.join(map(repr, missing))} not set "
                             "(the parameters cell must define every declared name)")
    return {k: check_value(k, given[k], spec[k]) for k in spec}


# --- declarations, one block per notebook -------------------------------------------------

DEVICES = ("cpu", "cuda", "auto")
INIT_SCHEMES = ("he-fan-in", "he-fan-out", "xavier", "glorot", "fixed", "pytorch")
ACTIVATIONS = ("relu", "prelu-shared", "prelu-channel-wise")

SPECS: dict[str, dict[str, Param]] = {
    "01_variance": {
        "depth": Param("int", "weight layers in the probed conv stack and MLP", low=2),
        "width": Param("int", "channels (conv stack) and units (MLP) per layer", low=4, high=4096),
        "kernel_size": Param("int", "conv kernel size k (fan-in n = k^2 c)", low=1, high=7),
        "spatial": Param("int", "height and width of the conv stack's feature maps", low=4, high=224),
        "activation": Param("str", "between layers in the scheme comparison (prelu: a = prelu_a[0])",
                            choices=("relu", "prelu")),
        "prelu_a": Param("float-list", "initial PReLU coefficients compared (Eq. 15)", low=0.0, high=1.0),
        "schemes": Param("str-list", "initialisations compared", choices=INIT_SCHEMES),
        "draws": Param("int", "independent weight draws per case", low=1, high=1000),
        "batch_size": Param("int", "N(0, 1) input samples per draw", low=2, high=100000),
        "seed": Param("int", "random seed", low=0),
        "device": Param("str", "where to run", choices=DEVICES),
    },
    "02_convergence": {
        "dataset": Param("str", "fashion-mnist (in memory) or imagefolder (an ImageNet-style folder: data_dir)",
                         choices=("fashion-mnist", "imagefolder")),
        "data_dir": Param("str", "imagefolder: the folder holding train/ and val/", nullable=True, is_dir=True),
        "width": Param("float", "multiplier on every conv and fc1/fc2 width (1.0 = the paper's)", low=0.01, high=1.0),
        "he_init": Param("str", "He's form in the main runs: Eq. 14 (fan-out, the paper's) or Eq. 10 (fan-in)",
                         choices=("he-fan-out", "he-fan-in")),
        "batch_size": Param("int", "mini-batch size", low=1, high=4096),
        "lr": Param("float", "constant learning rate of the main runs", low=1e-6, high=1.0),
        "epochs": Param("int", "training epochs of every run", low=1, high=200),
        "model_b_epochs": Param("int", "epochs of the 22-layer runs (None: epochs)", low=1, high=200, nullable=True),
        "max_steps": Param("int", "stop every main run after this many steps (None: epochs)", low=1, nullable=True),
        "train_subset": Param("int", "train on this many random training images (None: all)", low=1, nullable=True),
        "eval_subset": Param("int", "held-out images evaluated inside epochs (Figs. 2-3: 3,000)", low=10),
        "test_subset": Param("int", "held-out images evaluated at epoch ends (None: all)", low=10, nullable=True),
        "evals_per_epoch": Param("int", "evaluations of the eval subset per epoch", low=1, high=100),
        "grad_steps": Param("int", "per-layer gradient norms at each of the first k steps", low=1, high=10000),
        "grad_norm_every": Param("int", "and every k steps after (0: never)", low=0),
        "sweep_model": Param("str", "model of the learning-rate sweep", choices=("deep30", "model_b", "small14")),
        "sweep_lrs": Param("float-list", "learning rates of the sweep", low=1e-6, high=1.0),
        "sweep_inits": Param("str-list", "initialisations of the sweep (he-fan-out-conv: Eq. 14 on convs, Eq. 10 "
                                         "on fc layers)", choices=("he-fan-out", "he-fan-in", "he-fan-out-conv", "xavier")),
        "sweep_max_steps": Param("int", "stop every sweep run after this many steps (None: as the main runs)",
                                 low=1, nullable=True),
        "stalled_top1": Param("float", "top-1 error at or above this counts as still at chance", low=0.0, high=1.0),
        "seed": Param("int", "seeds the init, the data order and dropout of every run", low=0),
        "device": Param("str", "where to run", choices=DEVICES),
        "bf16": Param("bool", "bf16 autocast (GPUs; slow on CPUs without bf16 units)"),
        "threads": Param("int", "torch threads (None: torch's default)", low=1, nullable=True),
    },
    "03_prelu": {
        "activations": Param("str-list", "activations compared on the 14-layer model (Table 2)", choices=ACTIVATIONS),
        "seeds": Param("int-list", "every activation runs once per seed (same data order, same initial draws)", low=0),
        "xavier_seeds": Param("int", "ReLU runs with the paper's Xavier init on the first this-many seeds (0: none)",
                              low=0, high=100),
        "init": Param("str", "He's form in the main runs: Eq. 14 (fan-out, the paper's) or Eq. 10 (fan-in)",
                      choices=("he-fan-out", "he-fan-in")),
        "prelu_aware": Param("bool", "PReLU runs initialised by Eq. 15: (1 + a^2) n Var[w] / 2 = 1, a = 0.25"),
        "width": Param("float", "multiplier on every conv and fc1/fc2 width (1.0 = the paper's)", low=0.01, high=1.0),
        "dropout": Param("float", "dropout on fc1 and fc2 (the paper: 0.5)", low=0.0, high=0.95),
        "dataset": Param("str", "fashion-mnist (in memory) or imagefolder (an ImageNet-style folder: data_dir)",
                         choices=("fashion-mnist", "imagefolder")),
        "data_dir": Param("str", "imagefolder: the folder holding train/ and val/", nullable=True, is_dir=True),
        "input_size": Param("int", "imagefolder: side of the training and test views (the paper: 224)", low=8,
                            high=1024),
        "scale_range": Param("int-list", "imagefolder: [low, high] of the training images' shorter side "
                                         "(the small model: [256, 256])", low=8, high=4096),
        "eval_views": Param("str", "imagefolder: epoch-end test views (the paper: ten)", choices=("ten", "center")),
        "train_subset": Param("int", "train on this many random training images (None: all)", low=1, nullable=True),
        "eval_subset": Param("int", "held-out images evaluated inside epochs", low=10),
        "test_subset": Param("int", "held-out images of the final numbers (None: all)", low=10, nullable=True),
        "epochs": Param("int", "training epochs of every run (the paper: 75)", low=1, high=200),
        "batch_size": Param("int", "mini-batch size (the paper: 128)", low=1, high=4096),
        "lr": Param("float", "initial learning rate (the paper: 0.01)", low=1e-6, high=1.0),
        "lr_schedule": Param("str", "divide lr by 10 at lr_steps, or when held-out error plateaus (the paper's)",
                             choices=("steps", "plateau")),
        "lr_steps": Param("int-list", "steps schedule: epochs at which lr is divided by 10 (None: never)", low=1,
                          nullable=True),
        "patience": Param("int", "plateau schedule: epochs without improvement before a drop", low=1, high=100),
        "weight_decay": Param("float", "weight decay on conv/fc weights, never on PReLU's a (the paper: 5e-4)",
                              low=0.0, high=0.1),
        "augment": Param("bool", "random flips and translations (imagefolder: flips and PCA colour jitter)"),
        "evals_per_epoch": Param("int", "evaluations of the eval subset per epoch", low=1, high=100),
        "device": Param("str", "where to run", choices=DEVICES),
        "bf16": Param("bool", "bf16 autocast (GPUs; slow on CPUs without bf16 units)"),
        "threads": Param("int", "torch threads per run (None: torch's default)", low=1, nullable=True),
        "processes": Param("int", "CPU: runs trained side by side in worker processes", low=1, high=64),
        "gpus": Param("int", "CUDA: GPUs each run is spread over by DDP (torchrun) (None: all visible)", low=1,
                      nullable=True),
        "num_workers": Param("int", "imagefolder: loader worker processes (None: the CPUs per GPU, minus one)",
                             low=0, nullable=True),
        "reuse": Param("bool", "take finished runs with the same parameters instead of training again"),
    },
    "08_performance": {
        "steps": Param("int", "timed training steps per measurement", low=2, high=100000),
        "recipe_workers": Param("int-list", "DataLoader worker counts tried for the usual recipe", low=0, high=64),
        "jpeg_images": Param("int", "synthetic JPEGs for the ImageNet pipeline benchmark", low=64, high=100000),
        "jpeg_workers": Param("int-list", "worker counts for the JPEG pipeline", low=0, high=64),
    },
    "09_scorecard": {
        "variance_factor": Param("float", "measured/predicted variance within this factor is on the line", low=1.0),
        "stalled_top1": Param("float", "top-1 error at or above this counts as stalled at chance", low=0.0, high=1.0),
        "gradient_ratio": Param("float", "He/Xavier first-layer gradient norm above which gradients vanish", low=1.0),
        "margin_points": Param("float", "top-1 differences below this many points are no clear difference", low=0.0),
        "z": Param("float", "standard errors a difference must exceed to count", low=0.0),
        "coefficient_gap": Param("float", "conv1's PReLU coefficient must exceed the conv3 stage's mean by this",
                                 low=0.0),
    },
}


def spec_for(notebook: str) -> dict[str, Param]:
    try:
        return SPECS[notebook]
    except KeyError:
        raise ParameterError(f"no parameter declaration for notebook {notebook!r}; "
                             f"known: {', '.join(SPECS)}") from None


# --- profiles ---------------------------------------------------------------------------

def notebooks() -> list[str]:
    """The book's notebooks, by stem, in chapter order."""
    return sorted(p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def profiles() -> list[str]:
    return sorted(p.name for p in PROFILES_DIR.iterdir() if p.is_dir()) if PROFILES_DIR.is_dir() else []


def profile_file(profile: str, notebook: str) -> Path | None:
    """The YAML file papermill reads with -f for this notebook, or None (notebook defaults)."""
    path = PROFILES_DIR / profile / f"{notebook}.yaml"
    return path if path.is_file() else None


def check_profile(profile: str, *, check_paths: bool = True) -> dict[str, dict[str, Any]]:
    """Validate every file of a profile against its notebook's declaration; return the values.

    Refused: a profile directory that does not exist, a file for a notebook that does not
    exist, a name the notebook does not declare, a value it does not allow.
    """
    directory = PROFILES_DIR / profile
    if not directory.is_dir():
        raise ParameterError(f"profile {profile!r} does not exist (no directory {directory}); "
                             f"available profiles: {', '.join(profiles()) or 'none'}")
    known = notebooks()
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.y*ml")):
        if path.stem not in known:
            raise ParameterError(f"profile {profile!r}: {path.name} names no notebook; "
                                 f"notebooks: {', '.join(known)}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParameterError(f"profile {profile!r}: {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ParameterError(f"profile {profile!r}: {path} must map parameter names to values")
        spec = spec_for(path.stem)
        unknown = sorted(set(values) - set(spec))
        if unknown:
            raise ParameterError(f"profile {profile!r}, {path.name}: unknown parameter(s) "
                                 f"{', '.join(map(repr, unknown))}; {path.stem} takes: {', '.join(spec)}")
        for name, value in values.items():
            try:
                check_value(name, value, spec[name], check_paths=check_paths)
            except ParameterError as e:
                raise ParameterError(f"profile {profile!r}, {path.name}: {e}") from None
        out[path.stem] = values
    return out
