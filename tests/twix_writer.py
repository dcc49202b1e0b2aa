"""Write small Siemens twix (VD/VE) files for tests, through ``twixtools.write_twix``.

A VD/VE measurement is a protocol header followed by measurement data blocks (MDBs): one
scan header (MDH: flags, loop counters, k-space centre indices) and per coil a channel header
and the complex64 samples. twixtools writes the multi-RAID file header, the MDBs and the final
ACQEND block; the protocol header is built here: ``uint32 length, uint32 number of buffers``,
then per buffer ``name\\0, uint32 length, text``. The ``MeasYaps`` buffer holds the ASCCONV
protocol (``sKSpace.lPhaseEncodingLines = 6`` ...), ``Dicom`` an XProtocol with the readout
oversampling factor — the fields the converter reads, in the syntax of real files.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Line:
    """One readout: ``data`` (C, samples); MDH counters, centre indices and flags."""

    data: np.ndarray
    counters: dict[str, int] = field(default_factory=dict)
    center_col: int | None = None  # default: samples // 2
    center_lin: int = 0
    center_par: int = 0
    flags: tuple[str, ...] = ()


def _ascconv(values: dict[str, float | int | str]) -> str:
    body = "".join(f"{key} = {value}\n" for key, value in values.items())
    return f"### ASCCONV BEGIN object=MrProtDataImpl@MrProtocolData version=51130001 ###\n{body}### ASCCONV END ###\n"


def header_bytes(meas_yaps: dict[str, float | int | str], os_factor: float | None = 2.0) -> bytes:
    """The protocol header of one measurement (MeasYaps ASCCONV, Dicom XProtocol)."""
    buffers = {"Config": '<XProtocol>\n{\n  <ParamString."tPatientName">  { "xx" }\n}\n',
               "MeasYaps": _ascconv(meas_yaps)}
    if os_factor is not None:
        param = f'<ParamDouble."flReadoutOSFactor">  {{ <Precision> 16  {os_factor}  }}'
        buffers["Dicom"] = f"<XProtocol>\n{{\n  {param}\n}}\n"
    body = b""
    for name, text in buffers.items():
        raw = text.encode("latin1")
        body += name.encode() + b"\x00" + struct.pack("<I", len(raw)) + raw
    return struct.pack("<II", 8 + len(body), len(buffers)) + body


def write_twix_file(path: str | Path, lines: list[Line], meas_yaps: dict[str, float | int | str],
                    os_factor: float | None = 2.0) -> Path:
    """Write ``lines`` as one VD/VE measurement; returns ``path``."""
    import twixtools
    from twixtools.mdb import Mdb_local

    mdbs = []
    for line in lines:
        mdb = Mdb_local(np.ascontiguousarray(line.data, dtype=np.complex64))
        for name, value in line.counters.items():
            setattr(mdb.mdh.Counter, name, int(value))
        mdb.mdh.CenterCol = line.data.shape[-1] // 2 if line.center_col is None else line.center_col
        mdb.mdh.CenterLin = line.center_lin
        mdb.mdh.CenterPar = line.center_par
        for flag in line.flags:
            mdb.add_flag(flag)
        mdbs.append(mdb)
    acqend = Mdb_local()
    acqend.add_flag("ACQEND")
    mdbs.append(acqend)
    scan = {"hdr_str": np.frombuffer(header_bytes(meas_yaps, os_factor), dtype="S1"), "mdb": mdbs}
    twixtools.write_twix([scan], str(path))
    return Path(path)
