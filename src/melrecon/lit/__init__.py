"""Lightning side of melrecon: the training module, its loss, callbacks, the app.

The metrics it logs are :mod:`melrecon.metrics` (shared with ``python -m melrecon.reconstruct``).
"""

from melrecon.lit.callbacks import CpuThreadFollower, LearningRateMonitor, NetStatsLogger, PeakMemoryMonitor, ReconImageLogger
from melrecon.lit.console import ConsoleSummary
from melrecon.lit.losses import ReconLoss
from melrecon.lit.module import ReconModule

__all__ = ["ReconModule", "ReconLoss", "LearningRateMonitor", "PeakMemoryMonitor", "NetStatsLogger",
           "ReconImageLogger", "ConsoleSummary", "CpuThreadFollower"]
