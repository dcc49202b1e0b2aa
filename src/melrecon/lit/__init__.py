"""Lightning side of melrecon: the training module, fastMRI metrics, callbacks, the app."""

from melrecon.lit.callbacks import NetStatsLogger, PeakMemoryMonitor, ReconImageLogger
from melrecon.lit.losses import ReconLoss
from melrecon.lit.metrics import VolumeAccumulator, ssim_slices, volume_nmse, volume_psnr
from melrecon.lit.module import ReconModule

__all__ = ["ReconModule", "ReconLoss", "VolumeAccumulator", "ssim_slices", "volume_psnr", "volume_nmse",
           "PeakMemoryMonitor", "NetStatsLogger", "ReconImageLogger"]
