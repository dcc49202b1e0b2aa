"""MRI forward model: centred FFTs, SENSE, sampling masks, coil maps and CG-SENSE.

Nothing here learns; everything is differentiable torch code (SigPy is used only for the
Poisson-disc sampler and ESPIRiT, which run once per mask / per scan on the CPU).
"""

from melrecon.physics.cg import CGLog, CGResult, cg_sense, conjugate_gradient
from melrecon.physics.coils import birdcage_maps, espirit_maps, rss, sense_combine
from melrecon.physics.fft import fftc, ifftc
from melrecon.physics.masks import MaskResult, interleaved_kt, poisson_disc, variable_density_kt
from melrecon.physics.operators import LinearOperator
from melrecon.physics.sense import SenseOperator

__all__ = [
    "CGLog",
    "CGResult",
    "LinearOperator",
    "MaskResult",
    "SenseOperator",
    "birdcage_maps",
    "cg_sense",
    "conjugate_gradient",
    "espirit_maps",
    "fftc",
    "ifftc",
    "interleaved_kt",
    "poisson_disc",
    "rss",
    "sense_combine",
    "variable_density_kt",
]
