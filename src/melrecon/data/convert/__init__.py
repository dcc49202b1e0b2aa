"""Converters from real raw-data formats to the melrecon layout (one module per format).

CLI: ``python -m melrecon.data.convert {mridata,fastmri,ocmr,cmrxrecon,twix} IN OUT``; magnitude
NIfTI volumes to simulated k-space: ``python -m melrecon.data.convert nifti IN OUT``
(:mod:`melrecon.data.convert.nifti`, its own options).
"""

from melrecon.data.convert.cmrxrecon import convert_cmrxrecon, read_cmrxrecon
from melrecon.data.convert.fastmri import convert_fastmri, read_fastmri
from melrecon.data.convert.mridata import convert_mridata, read_mridata
from melrecon.data.convert.ocmr import convert_ocmr, read_ocmr
from melrecon.data.convert.twix import convert_twix, read_twix

CONVERTERS = {
    "mridata": convert_mridata,
    "fastmri": convert_fastmri,
    "ocmr": convert_ocmr,
    "cmrxrecon": convert_cmrxrecon,
    "twix": convert_twix,
}

__all__ = [
    "CONVERTERS",
    "convert_cmrxrecon",
    "convert_fastmri",
    "convert_mridata",
    "convert_ocmr",
    "convert_twix",
    "read_cmrxrecon",
    "read_fastmri",
    "read_mridata",
    "read_ocmr",
    "read_twix",
]
