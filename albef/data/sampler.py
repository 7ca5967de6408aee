"""Resumable distributed sampler.

Each epoch has one global permutation, drawn from (seed, epoch) and identical on every rank.
`consumed` counts the GLOBAL samples of that permutation already trained on; rank r of R then
reads ``permutation[consumed:][r::R]``. Because the remaining samples do not depend on how many
ranks consumed the first part, a run stopped after `consumed` samples can resume on any world
size and still see every remaining sample of the epoch exactly once (less a ``drop_last`` tail
shorter than R).

Use: ``sampler.set_epoch(e)`` (resets the start to 0), then ``sampler.set_start(consumed)`` when
resuming mid-epoch, then iterate.
"""
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(
        self,
        dataset_len: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"sampler rank {rank} is outside [0, {num_replicas})")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and start it from the beginning."""
        self.epoch = epoch
        self.start = 0

    def set_start(self, consumed: int) -> None:
        """Skip the first `consumed` samples (counted over all ranks) of this epoch's permutation."""
        if not 0 <= consumed <= self.dataset_len:
            raise ValueError(f"consumed={consumed} is outside [0, {self.dataset_len}] samples of this epoch")
        self.start = consumed

    def permutation(self) -> torch.Tensor:
        """The epoch's global order, the same on every rank."""
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_len, generator=generator)

    def _remaining(self) -> torch.Tensor:
        rest = self.permutation()[self.start:]
        tail = len(rest) % self.num_replicas
        if self.drop_last:
            return rest[: len(rest) - tail]
        if tail:  # pad by wrapping around so every rank gets the same count
            pad = self.num_replicas - tail
            rest = torch.cat([rest, self.permutation()[:pad]])
        return rest

    def __iter__(self) -> Iterator[int]:
        return iter(self._remaining()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        rest = self.dataset_len - self.start
        if self.drop_last:
            return rest // self.num_replicas
        return -(-rest // self.num_replicas)
