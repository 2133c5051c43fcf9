"""Batches from a data set held in memory as uint8, with whole-batch augmentation.

In the spirit of airbench: no DataLoader, no per-sample Python. The uint8 images sit on the
device; a batch is an index, a cast, a normalisation and a vectorised flip/translate. The data
order of epoch e is a permutation drawn from a generator seeded with (seed, e), so a resumed
run sees exactly the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch


def batch_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], zero-filled.

    Equivalent to zero-padding by max_shift and taking a random crop of the original size
    (the paper's random-crop augmentation at a scale that suits 28x28 images)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device=generator.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device)[None, :])  # [n, h]
    cols = (dx[:, None] + torch.arange(w, device=images.device)[None, :])  # [n, w]
    index = torch.arange(n, device=images.device)[:, None, None]
    # Gather rows then columns for all images at once: [n, c, h, w].
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def batch_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left-right (the paper's 50 % horizontal flips)."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class InMemoryBatches:
    """Iterate over (images float [B, C, H, W], labels [B]) batches of an in-memory uint8 set.

    images: uint8 [N, C, H, W]; labels: int64 [N]. Normalisation is (x/255 - mean) / std with
    the training set's mean and std (one number per channel). augment: random flips and
    translations of up to `max_shift` pixels (training only)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, mean: torch.Tensor,
                 std: torch.Tensor, shuffle: bool, augment: bool = False, max_shift: int = 2,
                 drop_last: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                 channels_last: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images: expected uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.max_shift, self.drop_last, self.seed = max_shift, drop_last, seed
        self.mean = mean.to(self.device).view(1, -1, 1, 1)
        self.std = std.to(self.device).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self, epoch: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return g

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`, from batch number `start` on (for resuming mid-epoch)."""
        g = self._generator(epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            if self.augment:
                # Drawn for every batch, also skipped ones, so the augmentation stream after
                # a resume is the one the uninterrupted run used.
                seed = int(torch.randint(0, 2**62, (1,), generator=g, device=self.device))
            if i < start:
                continue
            x = self.images[index].float().div_(255).sub_(self.mean).div_(self.std)
            if self.augment:
                bg = torch.Generator(device=self.device)
                bg.manual_seed(seed)
                x = batch_translate(batch_flip(x, bg), self.max_shift, bg)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[index]

    def __iter__(self):
        return self.epoch(0)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    x = images.float().div_(255)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
