"""Which samples a rank sees, in what order, and with what augmentation randomness.

Augmentation draws come from a generator seeded by (run seed, epoch, sample index), not from a data-loading
worker's stream, so a run resumed mid-epoch sees exactly the images an uninterrupted run would have seen. The
alternating flip is a function of (run seed, epoch, sample index) alone, for the same reason.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset

__all__ = ["ShardSampler", "SeededSamples", "sample_seed", "alternating_flip", "fixed_subset"]


class ShardSampler(Sampler[int]):
    """A rank's shard of a shuffled epoch (``DistributedSampler``), skipping the samples a resumed run already used."""

    def __init__(self, sampler: DistributedSampler, skip: int = 0) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` of a run seeded with ``seed``."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % 2**63


def alternating_flip(seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` is mirrored in ``epoch`` under the derandomized flip of airbench (Jordan, 2024): a
    random half of the samples in even epochs and the other half in odd ones, so every two epochs show each image
    both ways where a random flip shows half of them one way only."""
    mirrored_first = random.Random(sample_seed(seed, -1, index)).random() < 0.5
    return mirrored_first != (epoch % 2 == 1)


class SeededSamples(Dataset):
    """``dataset[i]`` with torch's RNG seeded from (seed, epoch, i) for the duration of the call; :meth:`generator`
    gives the same stream to code that augments whole batches. With ``alternate_flip`` each image also comes
    mirrored as :func:`alternating_flip` says (after its per-image transform, which then holds no flip)."""

    def __init__(self, dataset: Dataset, seed: int, alternate_flip: bool = False) -> None:
        self.dataset, self.seed, self.epoch, self.alternate_flip = dataset, seed, 0, alternate_flip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a seed for every accelerator backend (with
            # a formatted stack each, 20x the cost per image) and leave their states changed
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            item = self.dataset[index]
        if self.mirrored(index) and isinstance(item, tuple):  # an unreadable image's BadImage passes as it is
            image, target = item
            return image.flip(-1), target
        return item

    def mirrored(self, index: int) -> bool:
        """Whether the alternating flip mirrors ``self[index]`` in this epoch (False with the per-image random flip)."""
        return self.alternate_flip and alternating_flip(self.seed, self.epoch, index)

    def generator(self, index: int) -> torch.Generator:
        """A generator drawing what ``self[index]``'s augmentation draws from torch's seeded RNG, in this epoch."""
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))


def fixed_subset(dataset: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """``size`` samples of ``dataset`` (all of them when it has fewer), drawn at random once for ``seed``: the same
    ones in the same order on every call, so studies can share a training budget; ``dataset`` itself without a size."""
    if not size:
        return dataset
    return Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size].tolist())
