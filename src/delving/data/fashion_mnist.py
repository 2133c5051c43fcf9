"""The default data set: Fashion-MNIST (Xiao et al. 2017), 70,000 real 28x28 grey images, 10 classes.

Sources, tried in order (the first whose files pass their checksums wins):
1. the project cache, `data/fashion-mnist/` (or $DELVING_DATA/fashion-mnist/);
2. the Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/`);
3. torchvision's download into the project cache, where the internet is reachable.
The checksums are of the *uncompressed* IDX bytes, so the same data gzipped by another tool
(Debian recompresses the upstream files) passes, and a truncated or altered file does not.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from delving.params import PROJECT_ROOT

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# sha256 and size of the uncompressed IDX files.
FILES = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}
HOW_TO_GET = (
    "Get Fashion-MNIST with one of:\n"
    "  sudo apt-get install dataset-fashion-mnist        # Debian/Ubuntu: files in /usr/share/datasets/fashion-mnist\n"
    "  .venv/bin/python -m delving.data fetch            # torchvision download into data/fashion-mnist (needs internet)\n"
    "  make data                                         # either of the above, whichever works here"
)


class DatasetError(RuntimeError):
    """The data set is missing or fails its checksum."""


def cache_dir() -> Path:
    return Path(os.environ.get("DELVING_DATA", PROJECT_ROOT / "data")) / "fashion-mnist"


def _read(path: Path) -> bytes:
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
        return f.read()


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def verified_files(directory: Path) -> dict[str, bytes] | None:
    """The four files' bytes if all are in `directory`, None if any is absent.

    Raises DatasetError if a file is present but truncated or altered."""
    paths = {stem: _find(directory, stem) for stem in FILES}
    if any(p is None for p in paths.values()):
        return None
    out = {}
    for stem, path in paths.items():
        sha, size = FILES[stem]
        try:
            data = _read(path)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DatasetError(f"{path} is unreadable ({e}); delete it and fetch again.\n{HOW_TO_GET}") from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise DatasetError(f"{path} fails its checksum ({len(data)} bytes, expected {size}): truncated "
                               f"or not Fashion-MNIST; delete it and fetch again.\n{HOW_TO_GET}")
        out[stem] = data
    return out


def download(directory: Path) -> None:
    """torchvision's download (needs the internet); keeps the .gz files in `directory`."""
    from torchvision.datasets import FashionMNIST

    staging = directory / "torchvision"
    FashionMNIST(staging, train=True, download=True)
    FashionMNIST(staging, train=False, download=True)
    for stem in FILES:
        shutil.copy(staging / "FashionMNIST" / "raw" / f"{stem}.gz", directory / f"{stem}.gz")
    shutil.rmtree(staging)


def locate(allow_download: bool = False) -> tuple[Path, dict[str, bytes]]:
    """The first source whose files are all present and verified."""
    for directory in (cache_dir(), DEBIAN_DIR):
        files = verified_files(directory)
        if files is not None:
            return directory, files
    if allow_download:
        cache_dir().mkdir(parents=True, exist_ok=True)
        try:
            download(cache_dir())
        except Exception as e:  # no network, blocked host, ...: say so and how to proceed
            raise DatasetError(f"Fashion-MNIST is not on this machine and the download failed ({e}).\n{HOW_TO_GET}") from None
        files = verified_files(cache_dir())
        if files is not None:
            return cache_dir(), files
    raise DatasetError(f"Fashion-MNIST not found in {cache_dir()} or {DEBIAN_DIR}.\n{HOW_TO_GET}")


def _idx_to_tensor(data: bytes) -> torch.Tensor:
    # IDX: 2 zero bytes, a type byte (0x08 = uint8), the number of dims, then big-endian dims.
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy())


_LOADED: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) for split "train" (60k) or "test" (10k)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: got {split!r}; allowed: 'train', 'test'")
    if not _LOADED:
        _, files = locate()
        for name, prefix in (("train", "train"), ("test", "t10k")):
            images = _idx_to_tensor(files[f"{prefix}-images-idx3-ubyte"]).unsqueeze(1)
            labels = _idx_to_tensor(files[f"{prefix}-labels-idx1-ubyte"]).long()
            _LOADED[name] = (images, labels)
    return _LOADED[split]


def fetch(install_debian: bool = False) -> Path:
    """Make the data available: verify what is here, else apt-get (as root) or download."""
    try:
        return locate()[0]
    except DatasetError as missing:
        if install_debian and os.geteuid() == 0 and shutil.which("apt-get") and Path("/etc/debian_version").exists():
            print("Fashion-MNIST not found: installing the Debian package dataset-fashion-mnist", file=sys.stderr)
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            result = subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], env=env)
            if result.returncode != 0:  # stale package lists on a fresh machine: update once, retry
                subprocess.run(["apt-get", "update", "-q"], env=env)
                subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], env=env)
            try:
                return locate()[0]
            except DatasetError:
                pass
        elif install_debian:
            print("Not root on Debian/Ubuntu: run  sudo apt-get install dataset-fashion-mnist", file=sys.stderr)
        try:
            return locate(allow_download=True)[0]
        except DatasetError:
            raise missing from None
