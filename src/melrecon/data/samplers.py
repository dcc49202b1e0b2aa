"""A distributed sampler that keeps all items of one file (volume) on one rank.

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
from torch.utils.data import Sampler


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
