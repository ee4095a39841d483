"""Which samples each step trains on, and the random numbers it draws, as pure functions of (seed, step).

Deriving every random draw from the seed and the step number (instead of advancing one generator through the run)
makes a resumed run take exactly the draws an uninterrupted run takes at the same step, whatever happened before
the restart: the property the resume test checks.
"""

from __future__ import annotations

import hashlib
import math

import torch


def seeded_generator(seed: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU generator for one (seed, purpose, index); distinct purposes never share a stream."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{index}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class BatchPlan:
    """Epochs of shuffled, bucket-pure batches.

    Each epoch shuffles the samples within every bucket, cuts them into batches of `batch_size` (a bucket's last
    batch may be smaller: every image is seen once per epoch), then shuffles the batch order.
    """

    def __init__(self, buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._buckets = [members for _, members in sorted(buckets.items())]
        self._batch_size = batch_size
        self._seed = seed
        self.batches_per_epoch = sum(math.ceil(len(m) / batch_size) for m in self._buckets)
        self._cached: tuple[int, list[list[int]]] | None = None

    def batch(self, step: int) -> list[int]:
        """Sample indices for 0-based `step`."""
        epoch, position = divmod(step, self.batches_per_epoch)
        return self._epoch(epoch)[position]

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            generator = seeded_generator(self._seed, "epoch", epoch)
            batches: list[list[int]] = []
            for members in self._buckets:
                order = torch.randperm(len(members), generator=generator).tolist()
                shuffled = [members[i] for i in order]
                batches += [shuffled[i : i + self._batch_size] for i in range(0, len(shuffled), self._batch_size)]
            order = torch.randperm(len(batches), generator=generator).tolist()
            self._cached = (epoch, [batches[i] for i in order])
        return self._cached[1]
