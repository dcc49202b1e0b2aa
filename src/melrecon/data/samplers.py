"""Samplers: whole volumes per rank for evaluation; (epoch, index) keys for training.

:class:`KeyedSampler` is torch's ``DistributedSampler`` (also with one process: its shuffle is
a permutation seeded by ``seed + epoch``, which Lightning sets through ``set_epoch``) yielding
``(epoch, index)`` keys, from which the training datasets seed every random choice of an item
(slab start, acceleration, mask). Order and items are then functions of (seed, epoch, index),
and a run resumed at an epoch boundary sees exactly what the uninterrupted run saw.

A distributed sampler that keeps all items of one file (volume) on one rank:

Per-volume metrics (SSIM/PSNR over the whole volume with the volume's data range) need every
slab of a volume on the same process; torch's DistributedSampler interleaves items across
ranks. :class:`VolumeSampler` (the idea of fastMRI's ``VolumeSampler``) deals out whole files
round-robin (file i goes to rank ``i % world_size``) and yields that rank's items in order.
Ranks may get different numbers of items; nothing is padded or repeated, so each slab is
evaluated exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


class KeyedSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(epoch, index)`` (datasets accept both keys and ints).

    Args:
        dataset: the training dataset.
        shuffle: permute the items every epoch (seeded by ``seed + epoch``).
        seed: the run's data seed.
        num_replicas, rank: default: from torch.distributed if initialised, else one process.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        if num_replicas is None and not (dist.is_available() and dist.is_initialized()):
            num_replicas, rank = 1, 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = int(self.epoch)
        return ((epoch, int(i)) for i in super().__iter__())


class VolumeSampler(Sampler[int]):
    """Items of the files assigned to this rank, in dataset order.

    Args:
        dataset: a dataset with ``__len__`` and ``file_index(i)`` (SlabDataset, CineDataset).
        num_replicas: world size (default: from torch.distributed).
        rank: this rank (default: from torch.distributed).
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("VolumeSampler needs num_replicas and rank when torch.distributed is not initialised")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for num_replicas {num_replicas}")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.indices = [i for i in range(len(dataset)) if dataset.file_index(i) % self.num_replicas == self.rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """No-op (evaluation order is fixed); present so Lightning can call it."""
