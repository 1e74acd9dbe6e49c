"""The one DICOM decoder of the project.

`read_dicom` turns a file into a float32 greyscale image in [0, 1] the same way for every
caller (CBIS-DDSM import, masks, serving): modality LUT / rescale, VOI LUT or window,
MONOCHROME1 inversion, then min-max scaling of the whole image (the studies scale the whole
mammogram, not the patch). `read_header` reads only the tags needed to index a download.

Errors name the file: a missing file is a `DataError`, anything that cannot be parsed or
decoded (corrupt, truncated, not DICOM, compressed without a pixel handler) a `DicomError`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from mammodp.errors import DataError, DicomError

log = logging.getLogger(__name__)

# What to install for a compressed transfer syntax that pydicom cannot decode here. The
# pylibjpeg family is pure pip (no system libraries), so it is the route we point users to.
_INSTALL_HINTS = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless
}

# Exceptions pydicom and numpy raise on malformed input. Listed explicitly (no bare except)
# so that a genuine bug elsewhere still surfaces with its traceback.
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    NotImplementedError,
    RuntimeError,
    struct.error,
)


@dataclass(frozen=True)
class DicomHeader:
    """The tags needed to find and pair files of a download without decoding pixels."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    rows: int
    columns: int
    photometric: str
    transfer_syntax: str
    series_description: str
    frames: int = 1  # NumberOfFrames (1 when absent)
    samples_per_pixel: int = 1  # 1 for greyscale


@contextlib.contextmanager
def _pydicom_warnings_to_debug(path: Path) -> Iterator[None]:
    """pydicom warns (lazily, on attribute access) about each odd value it meets. For a file
    that then fails, our error says it all; a good file's oddities are not the user's to
    fix. Either way they must not add lines to the CLI's one-line error: log them at debug."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                log.debug("%s: %s", path, w.message)


@contextlib.contextmanager
def _quiet_pydicom_log() -> Iterator[None]:
    """pydicom logs a decoder's failure with a full traceback before raising it; our error
    names the file and the reason on one line, so its log is held back while decoding."""
    logger = logging.getLogger("pydicom")
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(old)


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line, without object reprs such as `<_io.BytesIO ... at 0x7f..>`."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(exc))
    return " ".join(text.split())


def _check_exists(path) -> None:
    if isinstance(path, Path) and not path.is_file():
        raise DataError("DICOM file not found", path=path)


def _dcmread(path: Path, *, stop_before_pixels: bool):
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        return dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise DicomError(f"not a DICOM file ({_one_line(exc)})", path=path) from exc
    except _PARSE_ERRORS as exc:
        raise DicomError(f"corrupt or truncated DICOM ({type(exc).__name__}: {_one_line(exc)})", path=path) from exc


def read_header(path: str | Path | BinaryIO) -> DicomHeader:
    """Read a DICOM file's identifying tags without touching its pixel data.

    Args:
        path: the .dcm file, or a binary file object (e.g. `io.BytesIO` of a request's bytes:
            the sizes can be checked before anything is decoded).

    Returns:
        The study/series/instance UIDs, image size, photometric interpretation, transfer
        syntax and series description ('' where a tag is absent).

    Raises:
        DataError: the file does not exist.
        DicomError: the file is not DICOM or its header is corrupt.
    """
    p = path if hasattr(path, "read") else Path(path)
    _check_exists(p)
    with _pydicom_warnings_to_debug(p):
        ds = _dcmread(p, stop_before_pixels=True)
        meta = getattr(ds, "file_meta", None)
        try:
            return DicomHeader(
                path=p,
                study_uid=str(ds.get("StudyInstanceUID", "")),
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                sop_uid=str(ds.get("SOPInstanceUID", "")),
                rows=int(ds.get("Rows", 0) or 0),
                columns=int(ds.get("Columns", 0) or 0),
                photometric=str(ds.get("PhotometricInterpretation", "")).strip().upper(),
                transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
                series_description=str(ds.get("SeriesDescription", "")),
                frames=int(ds.get("NumberOfFrames", 1) or 1),
                samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
            )
        except _PARSE_ERRORS as exc:
            raise DicomError(f"corrupt DICOM header ({type(exc).__name__}: {_one_line(exc)})", path=p) from exc


def _require_decoder(ds, path: Path) -> None:
    """Fail early, with the fix, when the transfer syntax has no usable pixel handler."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not uid or not uid.is_compressed:
        return
    label = f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise DicomError(f"{label}: pydicom has no decoder for this transfer syntax", path=path) from exc
    if not decoder.is_available:
        hint = _INSTALL_HINTS.get(str(uid))
        fix = f"pip install {hint}" if hint else "; ".join(decoder.missing_dependencies)
        raise DicomError(f"{label}: no pixel handler installed; {fix}", path=path)


def normalise_minmax(arr: np.ndarray) -> np.ndarray:
    """Min-max scale a whole image to float32 [0, 1]; a constant image becomes all zeros."""
    a = np.asarray(arr, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DataError("image holds non-finite values")
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def read_dicom(path: str | Path) -> np.ndarray:
    """Decode a single-frame greyscale DICOM into float32 [0, 1], shape (rows, columns).

    Applies, in order: the modality LUT or rescale slope/intercept, the VOI LUT or window
    centre/width when present, min-max scaling of the whole image, and inversion for
    MONOCHROME1 (so that bright always means dense tissue). 8- to 16-bit, signed or not.

    Args:
        path: the .dcm file.

    Returns:
        float32 array in [0, 1].

    Raises:
        DataError: the file does not exist.
        DicomError: the file is not DICOM, is corrupt or truncated, is not a single-frame
            greyscale image, or uses a compressed transfer syntax with no installed handler
            (the message names the syntax and what to install).
    """
    p = Path(path)
    _check_exists(p)
    with _pydicom_warnings_to_debug(p), _quiet_pydicom_log():
        arr, photometric = _decode(p)
    try:
        out = normalise_minmax(arr)
    except DataError as exc:
        raise DicomError(str(exc), path=p) from exc
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 shows the minimum as white
    return out


def _decode(p: Path) -> tuple[np.ndarray, str]:
    """Pixels after modality and VOI transforms (float64), and the photometric interpretation."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _dcmread(p, stop_before_pixels=False)
    try:
        if "PixelData" not in ds:
            raise DicomError("no pixel data", path=p)
        _require_decoder(ds, p)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DicomError(f"expected a greyscale image, got PhotometricInterpretation {photometric}", path=p)
        raw = ds.pixel_array
        if raw.ndim != 2:
            raise DicomError(f"expected a single-frame 2-D image, got pixel shape {raw.shape}", path=p)
        arr = apply_modality_lut(raw, ds)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            arr = apply_voi_lut(arr, ds)
        return arr, photometric
    except _PARSE_ERRORS as exc:
        meta = getattr(ds, "file_meta", None)
        uid = str(meta.get("TransferSyntaxUID", "?")) if meta is not None else "?"
        raise DicomError(
            f"cannot decode pixel data (transfer syntax {uid}; {type(exc).__name__}: {_one_line(exc)})", path=p
        ) from exc


__all__ = ["DicomHeader", "read_header", "read_dicom", "normalise_minmax"]
