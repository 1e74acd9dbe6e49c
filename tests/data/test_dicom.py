"""The DICOM decoder: LUTs, windowing, MONOCHROME1, bit depths and named errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mammodp.data.dicom import read_dicom, read_header
from mammodp.errors import DataError, DicomError


def ramp(dtype=np.uint16, hi: int = 4000) -> np.ndarray:
    """A 48x64 horizontal ramp from 0 to `hi` (every row the same)."""
    row = np.linspace(0, hi, 64).round().astype(dtype)
    return np.tile(row, (48, 1))


def test_output_is_float32_minmax_scaled(tmp_path, make_dicom):
    img = read_dicom(make_dicom(tmp_path / "a.dcm", ramp()))
    assert img.dtype == np.float32 and img.shape == (48, 64)
    assert img.min() == 0.0 and img.max() == 1.0
    assert np.all(np.diff(img[0]) >= 0)


def test_monochrome1_is_inverted(tmp_path, make_dicom):
    m2 = read_dicom(make_dicom(tmp_path / "m2.dcm", ramp()))
    m1 = read_dicom(make_dicom(tmp_path / "m1.dcm", ramp(), photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == 1.0 and m1[0, -1] == 0.0


def test_negative_rescale_slope_is_applied(tmp_path, make_dicom):
    img = read_dicom(make_dicom(tmp_path / "s.dcm", ramp(), RescaleSlope=-1, RescaleIntercept=4000))
    assert img[0, 0] == 1.0 and img[0, -1] == 0.0


def test_window_applies_after_rescale(tmp_path, make_dicom):
    # Raw 0..100 -> rescaled -500..500; a window of 0 +- 100 in rescaled units keeps raw 40..60.
    raw = ramp(hi=100)
    img = read_dicom(
        make_dicom(tmp_path / "w.dcm", raw, RescaleSlope=10, RescaleIntercept=-500, WindowCenter=0, WindowWidth=200)
    )
    row, values = img[0], raw[0]
    assert np.all(row[values <= 39] == 0.0)
    assert np.all(row[values >= 61] == 1.0)
    inside = (values > 41) & (values < 59)
    assert inside.any() and np.all((row[inside] > 0) & (row[inside] < 1))
    mid = int(np.argmin(np.abs(values.astype(int) - 50)))
    assert row[mid] == pytest.approx(0.5 + (int(values[mid]) - 50) / 20, abs=0.06)


def test_voi_lut_sequence_is_used(tmp_path, make_dicom):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]  # 4 entries, first input value 0, 16-bit output
    # raw 0 -> 0, raw 1 or 2 -> 1000, raw >= 3 -> 3000 (OW: little-endian bytes)
    lut.LUTData = np.array([0, 1000, 1000, 3000], dtype="<u2").tobytes()
    raw = np.tile(np.array([0, 1, 2, 3, 3, 3, 3, 3], dtype=np.uint16), (48, 8))
    img = read_dicom(make_dicom(tmp_path / "lut.dcm", raw, VOILUTSequence=Sequence([lut])))
    np.testing.assert_allclose(img[0, :4], [0.0, 1 / 3, 1 / 3, 1.0], atol=1e-3)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_bit_depths(tmp_path, make_dicom, dtype):
    raw = ramp(dtype=dtype, hi=200 if dtype == np.uint8 else 3000)
    if dtype == np.int16:
        raw = (raw.astype(np.int32) - 1500).astype(np.int16)
    img = read_dicom(make_dicom(tmp_path / "b.dcm", raw))
    assert img.min() == 0.0 and img.max() == 1.0
    hi = 200 if dtype == np.uint8 else 3000
    np.testing.assert_allclose(img[0], np.linspace(0, 1, 64), atol=1.0 / hi)


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "nope.dcm"
    with pytest.raises(DataError, match="nope.dcm") as info:
        read_dicom(path)
    assert not isinstance(info.value, DicomError)


def test_non_dicom_file_names_the_file(tmp_path):
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"this is not a dicom file at all" * 10)
    with pytest.raises(DicomError, match="junk.dcm"):
        read_dicom(path)
    with pytest.raises(DicomError, match="junk.dcm"):
        read_header(path)


def test_truncated_pixel_data_names_the_file(tmp_path, make_dicom):
    path = make_dicom(tmp_path / "cut.dcm", ramp())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2000])
    # The header is intact: indexing still works, decoding fails with the file's name.
    assert read_header(path).rows == 48
    with pytest.raises(DicomError, match="cut.dcm"):
        read_dicom(path)


def _encapsulated(path: Path, syntax: str) -> Path:
    """A DICOM whose transfer syntax is compressed, with junk as the compressed frame."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 48, 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([b"\x00\x01junk-not-a-codestream" * 8])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_compressed_syntax_without_handler_names_file_and_syntax(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS pixel handler is installed here")
    path = _encapsulated(tmp_path / "jls.dcm", JPEGLSLossless)
    with pytest.raises(DicomError) as info:
        read_dicom(path)
    msg = str(info.value)
    assert "jls.dcm" in msg and "1.2.840.10008.1.2.4.80" in msg and "JPEG-LS" in msg
    assert "no pixel handler installed" in msg and "pip install pylibjpeg" in msg


def test_jpeg2000_hint_when_no_handler(tmp_path, monkeypatch):
    import pydicom.pixels

    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Unavailable())
    path = _encapsulated(tmp_path / "j2k.dcm", "1.2.840.10008.1.2.4.90")
    with pytest.raises(DicomError) as info:
        read_dicom(path)
    assert str(info.value) == (
        f"{path}: JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90): "
        "no pixel handler installed; pip install pylibjpeg pylibjpeg-openjpeg"
    )


def test_corrupt_compressed_data_with_a_handler_names_the_file(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    if not get_decoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 handler installed")
    path = _encapsulated(tmp_path / "bad_j2k.dcm", JPEG2000Lossless)
    with pytest.raises(DicomError, match="bad_j2k.dcm"):
        read_dicom(path)


def test_header_reader_does_not_need_pixels(tmp_path, make_dicom):
    path = make_dicom(tmp_path / "h.dcm", ramp(), study_uid="1.2.3", series_uid="1.2.3.4", SeriesDescription="ROI")
    h = read_header(path)
    assert (h.study_uid, h.series_uid, h.rows, h.columns) == ("1.2.3", "1.2.3.4", 48, 64)
    assert h.series_description == "ROI" and h.photometric == "MONOCHROME2"
