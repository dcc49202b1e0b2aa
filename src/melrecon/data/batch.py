"""ReconBatch: the one item/batch type the datasets produce and the training code consumes.

A ``NamedTuple`` (as fastMRI's ``VarNetSample``): torch's ``default_collate`` stacks a list of
items into a batch of the same type (tensors gain a leading batch axis B, ``file`` becomes a
tuple of B names), and Lightning's batch transfer (``apply_to_collection``) moves its tensors
to the device field by field. Axis conventions of the two layouts: DESIGN.md, "Conventions".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class ReconBatch(NamedTuple):
    """One item (shapes below) or a collated batch (the same with a leading axis B).

    Layouts: a 3D slab of S consecutive readout positions (image (S, Y, Z)) or a cine series
    (image (T, X, Y)). Image values are in the item's units: the file's values divided by the
    file's ``max`` attribute when the dataset normalises (targets then O(1)).

    Fields:
        kspace: undersampled k-space y = M k, complex64; slab (C, S, Y, Z) in hybrid x-ky-kz
            space, cine (C, T, X, Y).
        mask: the sampling mask M, float32 0/1; slab (1, 1, Y, Z), cine (1, T, 1, Y).
        maps: coil sensitivities, complex64; slab (C, S, Y, Z), cine (C, 1, X, Y).
        x0: the zero-filled image A^H y (:class:`melrecon.physics.sense.SenseOperator`),
            complex64, the image shape.
        target: the fully-sampled coil combination S^H F^H k, complex64, the image shape.
        max: the metrics' data range, float32 scalar: max |target| over the whole file (cine
            with a crop: over the cropped series), in the item's units.
        file: path of the source file (str; a batch: a sequence of B paths).
        position: int64 scalar, where the item sits in its file: the first readout position
            of a slab (it covers ``position .. position + S - 1``) or the cine slice index.
        acceleration: float32 scalar, the achieved acceleration of ``mask`` (size / samples).
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    maps: torch.Tensor
    x0: torch.Tensor
    target: torch.Tensor
    max: torch.Tensor
    file: str | Sequence[str]
    position: torch.Tensor
    acceleration: torch.Tensor


__all__ = ["ReconBatch"]
