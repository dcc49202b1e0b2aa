"""The networks: residual CNN regularizers, data-consistency layers, the unrolled network.

Helper modules elsewhere in the package (e.g. reversible unrolls) are imported from their
own modules; this package namespace exports the MoDL-style pieces.
"""

from melrecon.models.dc import GradientStepDC, ProximalDC, SenseData, cg_tolerance
from melrecon.models.regularizers import BoundedConv, ResidualCNN
from melrecon.models.unrolled import UnrolledNet

__all__ = ["BoundedConv", "GradientStepDC", "ProximalDC", "ResidualCNN", "SenseData", "UnrolledNet", "cg_tolerance"]
