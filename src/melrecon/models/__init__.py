"""The networks: the unrolled base class and its two families, their CNNs and DC layers.

- :class:`UnrolledBase` (``base.py``): what every family shares (chain, options, checks, logging).
- :class:`UnrolledNet` (``unrolled.py``): MoDL, N x (residual CNN, DC).
- :class:`ReversibleUnrolledNet` (``reversible.py``): additive-coupling unrolls.
"""

from melrecon.models.base import UnrolledBase
from melrecon.models.dc import DataConsistency, GradientStepDC, ProximalDC, SenseData, cg_tolerance
from melrecon.models.regularizers import BoundedConv, ConvLayout, ConvStack, ResidualCNN
from melrecon.models.reversible import ReversibleUnroll, ReversibleUnrolledNet
from melrecon.models.unrolled import UnrolledNet

__all__ = [
    "BoundedConv",
    "ConvLayout",
    "ConvStack",
    "DataConsistency",
    "GradientStepDC",
    "ProximalDC",
    "ResidualCNN",
    "ReversibleUnroll",
    "ReversibleUnrolledNet",
    "SenseData",
    "UnrolledBase",
    "UnrolledNet",
    "cg_tolerance",
]
