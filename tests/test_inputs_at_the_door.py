"""Inputs checked at the door: each bad input is one clear line, exit 1, no traceback and no
partial output. Paths stay under the data root; ids are normalised once, at import, and
validation rejects empty or unnormalised ones; a header-only CSV and a corrupt JPEG 2000
DICOM are one line each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_cli_prepare import CBIS_COLUMNS, assert_one_line_error, build_bcdr, build_cbis, invoke, write_params

from mammodp.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _csv(root: Path, split: str = "train") -> Path:
    return root / f"mass_case_description_{split}_set.csv"


def _edit_cell(root: Path, row: int, column: str, value: str, split: str = "train") -> None:
    df = pd.read_csv(_csv(root, split), dtype=str, keep_default_na=False)
    df.loc[row, column] = value
    df.to_csv(_csv(root, split), index=False)


def _prepare(tmp_path: Path, root: Path, source: str = "cbis-ddsm"):
    out = tmp_path / "prepared" / "set"
    result = invoke("--source", source, "--root", str(root), "--out", str(out), "--params", str(write_params(tmp_path)))
    return result, out


def test_a_path_cell_pointing_at_a_valid_dicom_outside_the_root_is_refused(tmp_path, make_dicom):
    root = build_cbis(tmp_path / "raw", make_dicom)
    outside = make_dicom(tmp_path / "elsewhere" / "other.dcm", np.full((48, 64), 500, np.uint16))
    rel = os.path.relpath(outside, root)  # ../elsewhere/other.dcm
    _edit_cell(root, 0, "image file path", rel + "\n")
    result, out = _prepare(tmp_path, root)
    assert_one_line_error(result, "outside the data root", repr(rel))
    assert not out.exists()


@pytest.mark.parametrize("cell", ["../../../../../../etc/passwd", "/etc/passwd"])
def test_a_path_cell_escaping_to_system_files_is_never_opened(tmp_path, make_dicom, cell):
    root = build_cbis(tmp_path / "raw", make_dicom, n_train=4, n_test=1)
    _edit_cell(root, 1, "ROI mask file path", cell)
    result, out = _prepare(tmp_path, root)
    assert_one_line_error(result, "outside the data root", cell)
    assert not out.exists()


def test_a_bcdr_image_outside_the_root_is_refused(tmp_path):
    root = build_bcdr(tmp_path / "raw")
    csv = root / "BCDR-D01_dataset" / "bcdr_d01_outlines.csv"
    lines = csv.read_text().splitlines()
    outside = tmp_path / "elsewhere.tif"
    (root / "BCDR-D01_dataset" / "p0" / "img.tif").rename(outside)
    lines[1] = lines[1].replace("p0/img.tif", "../../elsewhere.tif")
    csv.write_text("\n".join(lines) + "\n")
    result, out = _prepare(tmp_path, root, "bcdr")
    assert_one_line_error(result, "outside the data root", "bcdr_d01_outlines.csv")
    assert not out.exists()


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_patient_id_is_refused_at_import(tmp_path, make_dicom, value):
    root = build_cbis(tmp_path / "raw", make_dicom)
    _edit_cell(root, 2, "patient_id", value)
    result, out = _prepare(tmp_path, root)
    assert_one_line_error(result, "row 4: empty patient_id", "mass_case_description_train_set.csv")
    assert not out.exists()


def test_an_empty_bcdr_patient_id_is_refused_at_import(tmp_path):
    root = build_bcdr(tmp_path / "raw")
    csv = root / "BCDR-D01_dataset" / "bcdr_d01_outlines.csv"
    lines = csv.read_text().splitlines()
    lines[2] = " ," + lines[2].split(",", 1)[1]
    csv.write_text("\n".join(lines) + "\n")
    result, out = _prepare(tmp_path, root, "bcdr")
    assert_one_line_error(result, "row 3: empty patient_id")
    assert not out.exists()


def test_ids_are_normalised_once_at_import(tmp_path, make_dicom):
    """'P_00002 ' in the test CSV and 'P_00002' in the train CSV are one patient: test keeps them."""
    root = build_cbis(tmp_path / "raw", make_dicom, n_train=8, n_test=2)
    _edit_cell(root, 0, "patient_id", " P_00002  ", split="test")
    result, out = _prepare(tmp_path, root)
    assert result.exit_code == 0, result.output
    df = read_manifest(out)
    assert set(df.loc[df["patient_id"] == "P_00002", "split"]) == {"test"}
    assert (df["patient_id"] == df["patient_id"].str.strip()).all()


def test_a_header_only_case_csv_is_one_line(tmp_path, make_dicom):
    root = build_cbis(tmp_path / "raw", make_dicom, n_train=4, n_test=1)
    pd.DataFrame(columns=CBIS_COLUMNS).to_csv(_csv(root, "train"), index=False)
    result, out = _prepare(tmp_path, root)
    assert_one_line_error(result, "mass_case_description_train_set.csv", "header but no rows")
    assert not out.exists()


def _corrupt_j2k(path: Path) -> Path:
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00not a codestream" * 8])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_corrupt_jpeg2000_dicom_is_one_line_without_pydicoms_traceback(tmp_path, make_dicom):
    root = build_cbis(tmp_path / "raw", make_dicom, n_train=2, n_test=1)
    bad = _corrupt_j2k(next((root / "CBIS-DDSM" / "Mass-Training_P_00001_LEFT_CC").rglob("1-1.dcm")))
    exe = Path(sys.executable).parent / "mammodp"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(exe), "prepare", "--source", "cbis-ddsm", "--root", str(root), "--out",
                           str(tmp_path / "o"), "--params", str(write_params(tmp_path))],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0] and "1.2.840.10008.1.2.4.90" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- validate


def _manifest(folder: Path, patient_ids: list[str], splits: list[str]) -> Path:
    from mammodp.data.imageio import save_patch

    rng = np.random.default_rng(0)
    rows = []
    for i, (pid, split) in enumerate(zip(patient_ids, splits)):
        save_patch(folder / "patches" / f"s{i}.png", rng.uniform(0.2, 0.8, (64, 64)))
        rows.append({"sample_id": f"s{i}", "patient_id": pid, "split": split, "label": i % 2,
                     "pathology": "MALIGNANT" if i % 2 else "BENIGN", "image_path": f"patches/s{i}.png",
                     "source": "cbis-ddsm"})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet")
    return folder / "manifest.parquet"


def _validate(tmp_path: Path, manifest: Path):
    from typer.testing import CliRunner

    from mammodp.cli import app

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    return CliRunner().invoke(app, ["validate", "--manifest", str(manifest), "--report-dir",
                                    str(tmp_path / "reports"), "--params", str(params)])


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_validate_rejects_an_empty_patient_id_naming_the_sample(tmp_path):
    ids = ["P1", "P1", "P2", "", "P3", "P3", "P4", "P4"]
    splits = ["train"] * 4 + ["test"] * 4
    line = _error_line(_validate(tmp_path, _manifest(tmp_path / "cbis", ids, splits)))
    assert "ids_well_formed(patient_id) (first: patient_id '', sample_id 's3')" in line, line


def test_validate_sees_a_trailing_space_patient_in_two_splits(tmp_path):
    import json

    ids = ["P_00001", "P_00001", "P_00002", "P_00002", "P_00002 ", "P_00003", "P_00003", "P_00004"]
    splits = ["train"] * 4 + ["test"] * 4
    line = _error_line(_validate(tmp_path, _manifest(tmp_path / "cbis", ids, splits)))
    assert "patients_disjoint_across_splits (first: patient_id 'P_00002'" in line, line
    assert "ids_well_formed(patient_id) (first: patient_id 'P_00002 ', sample_id 's4')" in line, line
    report = json.loads((tmp_path / "reports" / "cbis.json").read_text())
    disjoint = next(r for r in report["results"] if r["name"] == "patients_disjoint_across_splits")
    assert sorted(r["sample_id"] for r in disjoint["unexpected_all"]) == ["s2", "s3", "s4"]  # the full list
