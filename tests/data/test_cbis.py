"""CBIS-DDSM importer on tiny hand-built downloads, one quirk per test."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import generate_uid

from mammodp.data import cbis
from mammodp.data.patches import PatchGeometry
from mammodp.errors import DataError, DicomError

H, W = 48, 64
GEOMETRY = PatchGeometry(margin=4, min_size=16, patch_size=16)
COLUMNS = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]


@dataclass
class Lesion:
    abnormality: int = 1
    pathology: str = "MALIGNANT"
    centre: tuple[int, int] = (24, 32)  # (row, column)
    radius: int = 5


@dataclass
class Case:
    patient: str = "P_00001"
    side: str = "LEFT"
    view: str = "CC"
    split: str = "train"
    density: object = 2
    lesions: list[Lesion] = field(default_factory=lambda: [Lesion()])
    layout: str = "tcia"  # "tcia": CBIS-DDSM/<folder>/<date>/<series>/1-1.dcm; "csv": literal CSV paths
    roi_files: str = "one-series"  # "one-series" (1-1 cropped, 1-2 mask) | "swapped" | "separate"
    mask_shape: tuple[int, int] | None = None  # a mask of another size than its image
    photometric: str = "MONOCHROME2"

    @property
    def folder(self) -> str:
        kind = "Training" if self.split == "train" else "Test"
        return f"Mass-{kind}_{self.patient}_{self.side}_{self.view}"


def disk(centre, radius, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def write_case(root: Path, case: Case, make_dicom) -> list[dict]:
    """Write one case's image and ROI files; return its CSV rows."""
    rng = np.random.default_rng(zlib.crc32(case.folder.encode()))
    image = (rng.integers(200, 400, (H, W))).astype(np.uint16)
    for les in case.lesions:
        image[disk(les.centre, les.radius)] = 3000
    if case.photometric == "MONOCHROME1":
        image = (4095 - image).astype(np.uint16)  # stored inverted: lesion dark in the file
    study, series = generate_uid(), generate_uid()
    if case.layout == "tcia":
        base = root / "CBIS-DDSM" / case.folder / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515"
        make_dicom(base / "1-1.dcm", image, photometric=case.photometric, study_uid=study, series_uid=series)
    else:
        make_dicom(root / case.folder / study / series / "000000.dcm", image,
                   photometric=case.photometric, study_uid=study, series_uid=series)
    rows = []
    for les in case.lesions:
        roi_folder = f"{case.folder}_{les.abnormality}"
        mask_shape = case.mask_shape or (H, W)
        mask = disk(
            (les.centre[0] * mask_shape[0] / H, les.centre[1] * mask_shape[1] / W), les.radius, mask_shape
        ).astype(np.uint8) * 255
        r, c = les.centre
        crop = image[max(r - 8, 0) : r + 8, max(c - 8, 0) : c + 8].copy()
        roi_study, crop_series, mask_series = generate_uid(), generate_uid(), generate_uid()
        if case.roi_files == "one-series":
            mask_series = crop_series
        if case.layout == "tcia":
            top = root / "CBIS-DDSM" / roi_folder / "08-07-2016-DDSM-12345"
            if case.roi_files == "separate":
                crop_path = top / "1.000000-cropped images-111" / "1-1.dcm"
                mask_path = top / "1.000000-ROI mask images-222" / "1-1.dcm"
            else:
                series_dir = top / "1.000000-ROI mask images-333"
                first, second = ("1-2.dcm", "1-1.dcm") if case.roi_files == "swapped" else ("1-1.dcm", "1-2.dcm")
                crop_path, mask_path = series_dir / first, series_dir / second
        else:
            crop_path = root / roi_folder / roi_study / crop_series / "000000.dcm"
            mask_path = root / roi_folder / roi_study / mask_series / "000001.dcm"
        make_dicom(crop_path, crop, study_uid=roi_study, series_uid=crop_series)
        make_dicom(mask_path, mask, study_uid=roi_study, series_uid=mask_series)
        crop_cell = f"{roi_folder}/{roi_study}/{crop_series}/000000.dcm\n"
        mask_cell = f"{roi_folder}/{roi_study}/{mask_series}/000001.dcm\n"
        if case.roi_files == "swapped":  # the CSV columns name the wrong file, too
            crop_cell, mask_cell = mask_cell, crop_cell
        rows.append(
            {
                "patient_id": case.patient,
                "breast_density": case.density,
                "left or right breast": case.side,
                "image view": case.view,
                "abnormality id": les.abnormality,
                "abnormality type": "mass",
                "mass shape": "OVAL",
                "mass margins": "CIRCUMSCRIBED",
                "assessment": 4,
                "pathology": les.pathology,
                "subtlety": 3,
                "image file path": f"{case.folder}/{study}/{series}/000000.dcm\n",
                "cropped image file path": crop_cell,
                "ROI mask file path": mask_cell,
            }
        )
    return rows


def build(root: Path, cases: list[Case], make_dicom, *, density_column: str = "breast_density") -> Path:
    rows = {"train": [], "test": []}
    for case in cases:
        rows[case.split].extend(write_case(root, case, make_dicom))
    for split, name in (("train", "mass_case_description_train_set.csv"), ("test", "mass_case_description_test_set.csv")):
        df = pd.DataFrame(rows[split], columns=COLUMNS).rename(columns={"breast_density": density_column})
        df.to_csv(root / name, index=False)
    return root


def import_all(root: Path, **kwargs):
    tasks, skipped = cbis.plan(root, **kwargs)
    rows, patches, warnings = [], [], []
    for task in tasks:
        res = cbis.process_image(task, GEOMETRY, skip_errors=kwargs.get("skip_missing", False))
        rows += res.rows
        patches += res.patches
        warnings += res.warnings
        skipped += res.skipped
    return rows, patches, warnings, skipped


def lesion_at_centre(patch: np.ndarray) -> bool:
    """The bright lesion fills the patch centre and the corners are background."""
    c = patch.shape[0] // 2
    return patch[c - 1 : c + 1, c - 1 : c + 1].min() > 0.8 and max(patch[0, 0], patch[-1, -1]) < 0.3


@pytest.mark.parametrize("layout", ["tcia", "csv"])
def test_both_path_layouts_resolve(tmp_path, make_dicom, layout):
    build(tmp_path, [Case(layout=layout), Case(patient="P_00002", split="test", layout=layout)], make_dicom)
    rows, patches, warnings, skipped = import_all(tmp_path)
    assert len(rows) == 2 and not skipped and not warnings
    assert all(lesion_at_centre(p) for p in patches)
    by_id = {r["sample_id"]: r for r in rows}
    r = by_id["cbis-Mass-Training_P_00001_LEFT_CC_1"]
    assert r["split"] == "train" and r["source"] == "cbis-ddsm" and r["label"] == 1
    assert r["source_file"].endswith(".dcm") and "\n" not in r["source_file"]
    assert by_id["cbis-Mass-Test_P_00002_LEFT_CC_1"]["split"] == "test"


def test_path_cells_end_with_newline_in_the_fixture(tmp_path, make_dicom):
    build(tmp_path, [Case()], make_dicom)
    text = (tmp_path / "mass_case_description_train_set.csv").read_text()
    assert '000000.dcm\n"' in text  # the quirk is really present
    df = cbis.read_case_csv(tmp_path / "mass_case_description_train_set.csv", "train")
    assert not df["image_cell"].str.contains("\n").any()


@pytest.mark.parametrize("roi_files", ["swapped", "separate"])
@pytest.mark.parametrize("layout", ["tcia", "csv"])
def test_mask_told_apart_from_cropped_image_by_content(tmp_path, make_dicom, roi_files, layout):
    build(tmp_path, [Case(roi_files=roi_files, layout=layout)], make_dicom)
    rows, patches, warnings, skipped = import_all(tmp_path)
    assert len(patches) == 1 and lesion_at_centre(patches[0])


def test_mask_of_another_size_is_resized_with_a_warning(tmp_path, make_dicom):
    build(tmp_path, [Case(mask_shape=(40, 50))], make_dicom)
    rows, patches, warnings, _ = import_all(tmp_path)
    assert len(patches) == 1 and lesion_at_centre(patches[0])
    assert len(warnings) == 1 and "1-2.dcm" in warnings[0] and "40x50" in warnings[0]


def test_monochrome1_image_is_inverted(tmp_path, make_dicom):
    build(tmp_path, [Case(photometric="MONOCHROME1")], make_dicom)
    _, patches, _, _ = import_all(tmp_path)
    assert lesion_at_centre(patches[0])


def test_benign_without_callback_is_benign(tmp_path, make_dicom):
    build(tmp_path, [Case(lesions=[Lesion(pathology="BENIGN_WITHOUT_CALLBACK")])], make_dicom)
    rows, *_ = import_all(tmp_path)
    assert rows[0]["label"] == 0 and rows[0]["pathology"] == "BENIGN_WITHOUT_CALLBACK"


def test_several_lesions_per_image(tmp_path, make_dicom):
    lesions = [Lesion(1, "MALIGNANT", (12, 14), 4), Lesion(2, "BENIGN", (34, 48), 4)]
    build(tmp_path, [Case(lesions=lesions)], make_dicom)
    tasks, _ = cbis.plan(tmp_path)
    assert len(tasks) == 1 and len(tasks[0].lesions) == 2  # the image is decoded once
    rows, patches, _, _ = import_all(tmp_path)
    assert sorted(r["sample_id"] for r in rows) == [
        "cbis-Mass-Training_P_00001_LEFT_CC_1",
        "cbis-Mass-Training_P_00001_LEFT_CC_2",
    ]
    assert [r["label"] for r in rows] == [1, 0]
    assert all(lesion_at_centre(p) for p in patches)


@pytest.mark.parametrize("column", ["breast_density", "breast density"])
def test_both_density_spellings(tmp_path, make_dicom, column):
    build(tmp_path, [Case(density=3)], make_dicom, density_column=column)
    df = cbis.read_case_csv(tmp_path / "mass_case_description_train_set.csv", "train")
    assert df["breast_density"].tolist() == [3]


def test_attributes(tmp_path, make_dicom):
    build(tmp_path, [Case(side="RIGHT", view="MLO", density=4)], make_dicom)
    rows, *_ = import_all(tmp_path)
    r = rows[0]
    assert (r["view"], r["laterality"], r["breast_density"], r["assessment"], r["subtlety"]) == ("MLO", "RIGHT", 4, 4, 3)
    assert np.isnan(r["age"]) and r["patient_id"] == "P_00001"


def test_unknown_pathology_names_csv_and_value(tmp_path, make_dicom):
    build(tmp_path, [Case(lesions=[Lesion(pathology="MAYBE")])], make_dicom)
    with pytest.raises(DataError, match=r"mass_case_description_train_set.csv.*'MAYBE'"):
        cbis.plan(tmp_path)


def test_missing_file_names_row_path_and_csv(tmp_path, make_dicom):
    build(tmp_path, [Case(), Case(patient="P_00002")], make_dicom)
    for f in (tmp_path / "CBIS-DDSM" / "Mass-Training_P_00002_LEFT_CC").rglob("*.dcm"):
        f.unlink()
    with pytest.raises(DataError) as info:
        cbis.plan(tmp_path)
    msg = str(info.value)
    assert "Mass-Training_P_00002_LEFT_CC/" in msg and "mass_case_description_train_set.csv" in msg
    rows, _, _, skipped = import_all(tmp_path, skip_missing=True)
    assert len(rows) == 1 and skipped[0]["sample_ids"] == ["cbis-Mass-Training_P_00002_LEFT_CC_1"]


def test_corrupt_image_raises_dicom_error_naming_it(tmp_path, make_dicom):
    build(tmp_path, [Case()], make_dicom)
    (image,) = (tmp_path / "CBIS-DDSM" / "Mass-Training_P_00001_LEFT_CC").rglob("*.dcm")
    image.write_bytes(b"garbage" * 50)
    tasks, _ = cbis.plan(tmp_path)
    with pytest.raises(DicomError, match="1-1.dcm"):
        cbis.process_image(tasks[0], GEOMETRY)


def test_roi_folder_without_a_binary_mask(tmp_path, make_dicom):
    build(tmp_path, [Case()], make_dicom)
    (mask,) = (tmp_path / "CBIS-DDSM").rglob("1-2.dcm")
    make_dicom(mask, np.arange(H * W, dtype=np.uint16).reshape(H, W))  # greyscale, not a mask
    tasks, _ = cbis.plan(tmp_path)
    with pytest.raises(DataError, match="no binary ROI mask"):
        cbis.process_image(tasks[0], GEOMETRY)
    res = cbis.process_image(tasks[0], GEOMETRY, skip_errors=True)
    assert not res.rows and res.skipped[0]["sample_ids"] == ["cbis-Mass-Training_P_00001_LEFT_CC_1"]


def test_missing_csv_names_it(tmp_path):
    with pytest.raises(DataError, match="mass_case_description_train_set.csv"):
        cbis.plan(tmp_path)


def test_index_lists_files_under_every_ancestor_folder(tmp_path, make_dicom):
    build(tmp_path, [Case()], make_dicom)
    index = cbis.index_dicoms(tmp_path)
    assert len(index["Mass-Training_P_00001_LEFT_CC"]) == 1
    assert len(index["Mass-Training_P_00001_LEFT_CC_1"]) == 2
    assert len(index["CBIS-DDSM"]) == 3


def test_logs_duplicate_rows(tmp_path, make_dicom, caplog):
    build(tmp_path, [Case()], make_dicom)
    csv = tmp_path / "mass_case_description_train_set.csv"
    df = pd.read_csv(csv)
    pd.concat([df, df]).to_csv(csv, index=False)
    with caplog.at_level(logging.WARNING):
        cases = cbis.load_cases(tmp_path)
    assert len(cases) == 1 and "duplicate" in caplog.text
