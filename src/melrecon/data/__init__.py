"""k-space data: the HDF5 layout, synthetic datasets, converters, datasets and DataModules.

Submodules: :mod:`~melrecon.data.h5` (layout writer/reader), :mod:`~melrecon.data.validate`
(CLI), :mod:`~melrecon.data.synthetic` (CLI + presets), :mod:`~melrecon.data.phantoms`,
:mod:`~melrecon.data.convert` (CLI, one module per format), :mod:`~melrecon.data.datasets`,
:mod:`~melrecon.data.samplers`, :mod:`~melrecon.data.subsample`, :mod:`~melrecon.data.datamodule`,
:mod:`~melrecon.data.batch` (the item/batch type), :mod:`~melrecon.data.simulate` (image -> simulated
multi-coil k-space), :mod:`~melrecon.data.brain3d` (the brain study dataset).

Names are imported lazily so that the CLIs do not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "ReconBatch": "batch",
    "KspaceDataModule": "datamodule",
    "SlabDataset": "datasets",
    "CineDataset": "datasets",
    "LayoutError": "h5",
    "ScanInfo": "h5",
    "read_scan": "h5",
    "validate_file": "h5",
    "write_scan": "h5",
    "VolumeSampler": "samplers",
    "PRESETS": "synthetic",
    "generate_dataset": "synthetic",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"melrecon.data.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'melrecon.data' has no attribute {name!r}")
