"""Shared test fixtures (kept minimal): a writer of tiny DICOM files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    study_uid: str | None = None,
    series_uid: str | None = None,
    **tags,
) -> Path:
    """Write a single-frame greyscale DICOM (uncompressed) with optional extra tags.

    `pixels` is uint8 or uint16 (int16 for signed data); extra keyword tags are set on the
    dataset as-is (e.g. RescaleSlope=2, WindowCenter=100).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.ascontiguousarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "MG"
    bits = 8 if arr.dtype.itemsize == 1 else 16
    ds.set_pixel_data(arr, photometric_interpretation="MONOCHROME2", bits_stored=bits)
    ds.PhotometricInterpretation = photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p


@pytest.fixture
def make_dicom():
    """The `write_dicom` function, as a fixture."""
    return write_dicom


@pytest.fixture(scope="session", autouse=True)
def _private_mlflow_store(tmp_path_factory):
    """Never let a test write runs into the repo's own MLflow store: default to a temp one.

    Tests that need their own store still set MLFLOW_TRACKING_URI with monkeypatch.
    """
    import os

    old = os.environ.get("MLFLOW_TRACKING_URI")
    root = tmp_path_factory.mktemp("mlflow-store")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
