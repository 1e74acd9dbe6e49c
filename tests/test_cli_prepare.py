"""`mammodp prepare` end to end on tiny CBIS-DDSM / BCDR trees: outputs, errors, atomicity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from mammodp.cli import app
from mammodp.data.manifest import DTYPES, REQUIRED_COLUMNS, read_manifest

H, W = 48, 64
CBIS_COLUMNS = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]


def write_params(tmp_path: Path, **prepare) -> Path:
    """The repo's (complete) params with small-patch prepare settings."""
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["prepare"].update({"patch_size": 16, "margin": 4, "min_size": 16, "val_fraction": 0.25, "workers": 1})
    raw["prepare"].update(prepare)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def build_cbis(root: Path, make_dicom, n_train: int = 8, n_test: int = 2) -> Path:
    """A TCIA-layout download: one mass per image, alternating benign/malignant."""
    rows = {"train": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        folder = f"Mass-{'Training' if split == 'train' else 'Test'}_P_{i:05d}_LEFT_CC"
        yy, xx = np.mgrid[:H, :W]
        lesion = (yy - 20 - i % 5) ** 2 + (xx - 30) ** 2 <= 25
        image = np.full((H, W), 300, np.uint16) + np.uint16(i)
        image[lesion] = 3000
        study, series = generate_uid(), generate_uid()
        make_dicom(root / "CBIS-DDSM" / folder / "01-01-2017-DDSM-1" / "1.000000-full-1" / "1-1.dcm",
                   image, study_uid=study, series_uid=series)
        roi = root / "CBIS-DDSM" / f"{folder}_1" / "01-01-2017-DDSM-2" / "1.000000-ROI-2"
        make_dicom(roi / "1-1.dcm", image[10:30, 20:40].copy())
        make_dicom(roi / "1-2.dcm", lesion.astype(np.uint8) * 255)
        rows[split].append([
            f"P_{i:05d}", 1 + i % 4, "LEFT", "CC", 1, "mass", "OVAL", "CIRCUMSCRIBED", 4,
            "MALIGNANT" if i % 2 else "BENIGN", 3,
            f"{folder}/{study}/{series}/000000.dcm\n",
            f"{folder}_1/{generate_uid()}/{generate_uid()}/000000.dcm\n",
            f"{folder}_1/{generate_uid()}/{generate_uid()}/000001.dcm\n",
        ])
    for split in ("train", "test"):
        pd.DataFrame(rows[split], columns=CBIS_COLUMNS).to_csv(
            root / f"mass_case_description_{split}_set.csv", index=False
        )
    return root


def build_bcdr(root: Path) -> Path:
    base = root / "BCDR-D01_dataset"
    lines = ["patient_id, study_id, lesion_id, image_view, image_filename, lw_x_points, lw_y_points, "
             "mammography_nodule, age, density, classification"]
    for i in range(4):
        img = np.random.default_rng(i).integers(10, 40, (H, W)).astype(np.uint8)
        img[15:26, 25:36] = 200
        (base / f"p{i}").mkdir(parents=True)
        Image.fromarray(img).save(base / f"p{i}" / "img.tif")
        lines.append(f"{i}, 1, 1, {1 + i % 4},  p{i}/img.tif, 25 35 35 25, 15 15 25 25, 1, 50, {' N/A' if i else 2}, "
                     f"{' Malign' if i % 2 else 'Benign '}")
    (base / "bcdr_d01_outlines.csv").write_text("\n".join(lines) + "\n")
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, ["prepare", *args], catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("workers", [1, 2])
def test_cbis_prepare_writes_patches_and_manifest(tmp_path, make_dicom, workers):
    root = build_cbis(tmp_path / "raw", make_dicom)
    out = tmp_path / "prepared" / "cbis"
    params = write_params(tmp_path, workers=workers)
    result = invoke("--source", "cbis-ddsm", "--root", str(root), "--out", str(out), "--params", str(params))
    assert result.exit_code == 0, result.output
    assert "prepare cbis-ddsm: 10 patches" in result.stdout and "test 2 (1 benign / 1 malignant)" in result.stdout

    df = read_manifest(out / "manifest.parquet")
    assert set(REQUIRED_COLUMNS) <= set(df.columns) and len(df) == 10
    assert {c: str(df[c].dtype) for c in DTYPES} == {c: str(pd.Series(dtype=t).dtype) for c, t in DTYPES.items()}
    assert set(df["split"]) == {"train", "val", "test"} and (df["split"] == "val").sum() == 2
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert df["sample_id"].iloc[0] == "cbis-Mass-Test_P_00008_LEFT_CC_1"
    assert not any(Path(p).is_absolute() for p in df["image_path"])
    for path in df["abs_path"]:
        with Image.open(path) as im:
            assert im.size == (16, 16) and im.mode in ("I;16", "I")
    assert df["age"].isna().all() and df["breast_density"].notna().all()
    assert pd.read_csv(out / "manifest.csv")["sample_id"].tolist() == df["sample_id"].tolist()
    assert json.loads((out / "skipped.json").read_text())["skipped"] == []
    assert [p.name for p in tmp_path.joinpath("prepared").iterdir()] == ["cbis"]  # no temp leftovers


def test_same_inputs_give_identical_outputs(tmp_path, make_dicom):
    root = build_cbis(tmp_path / "raw", make_dicom)
    params = write_params(tmp_path)
    for name in ("a", "b"):
        assert invoke("--source", "cbis-ddsm", "--root", str(root), "--out", str(tmp_path / name),
                      "--params", str(params)).exit_code == 0
    for rel in ("manifest.csv", "patches/cbis-Mass-Training_P_00001_LEFT_CC_1.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_dicom_fails_with_one_line_and_no_output(tmp_path, make_dicom, workers):
    root = build_cbis(tmp_path / "raw", make_dicom)
    bad = next((root / "CBIS-DDSM" / "Mass-Training_P_00003_LEFT_CC").rglob("1-1.dcm"))
    bad.write_bytes(bad.read_bytes()[:400])  # truncated mid-header
    out = tmp_path / "prepared" / "cbis"
    params = write_params(tmp_path, workers=workers)
    result = invoke("--source", "cbis-ddsm", "--root", str(root), "--out", str(out), "--params", str(params))
    assert_one_line_error(result, str(bad))
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no partial temp folder either


def test_missing_dicom_fails_and_leaves_old_output_untouched(tmp_path, make_dicom):
    root = build_cbis(tmp_path / "raw", make_dicom)
    for f in (root / "CBIS-DDSM" / "Mass-Training_P_00002_LEFT_CC").rglob("*.dcm"):
        f.unlink()
    out = tmp_path / "prepared" / "cbis"
    out.mkdir(parents=True)
    (out / "manifest.csv").write_text("old\n")
    params = write_params(tmp_path)
    result = invoke("--source", "cbis-ddsm", "--root", str(root), "--out", str(out), "--params", str(params))
    assert_one_line_error(result, "Mass-Training_P_00002_LEFT_CC/", "mass_case_description_train_set.csv")
    assert [p.name for p in out.iterdir()] == ["manifest.csv"] and (out / "manifest.csv").read_text() == "old\n"


def test_on_error_skip_writes_the_report(tmp_path, make_dicom):
    root = build_cbis(tmp_path / "raw", make_dicom)
    bad = next((root / "CBIS-DDSM" / "Mass-Training_P_00003_LEFT_CC").rglob("1-1.dcm"))
    bad.write_bytes(b"not a dicom")
    for f in (root / "CBIS-DDSM" / "Mass-Training_P_00002_LEFT_CC").rglob("*.dcm"):
        f.unlink()
    out = tmp_path / "out"
    params = write_params(tmp_path, on_error="skip", workers=2)
    result = invoke("--source", "cbis-ddsm", "--root", str(root), "--out", str(out), "--params", str(params))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "skipped.json").read_text())
    files = {s["file"] for s in report["skipped"]}
    assert str(bad) in files and any("Mass-Training_P_00002_LEFT_CC/" in f for f in files)
    assert all(s["reason"] for s in report["skipped"])
    assert len(read_manifest(out)) == 8


def test_bcdr_prepare(tmp_path):
    root = build_bcdr(tmp_path / "raw")
    out = tmp_path / "bcdr"
    result = invoke("--source", "bcdr", "--root", str(root), "--out", str(out), "--params", str(write_params(tmp_path)))
    assert result.exit_code == 0, result.output
    df = read_manifest(out)
    assert len(df) == 4 and set(df["split"]) == {"external"} and set(df["source"]) == {"bcdr"}
    assert df["patient_id"].str.startswith("bcdr-d01/").all()
    assert df["breast_density"].isna().sum() == 3 and sorted(df["label"]) == [0, 0, 1, 1]


def test_unknown_source_and_missing_root(tmp_path):
    params = str(write_params(tmp_path))
    assert_one_line_error(invoke("--source", "inbreast", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--params", params), "inbreast")
    assert_one_line_error(invoke("--source", "bcdr", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                                 "--params", params), "nope")


def test_console_script_prints_no_traceback(tmp_path, make_dicom):
    root = build_cbis(tmp_path / "raw", make_dicom, n_train=2, n_test=1)
    bad = next((root / "CBIS-DDSM" / "Mass-Training_P_00001_LEFT_CC").rglob("1-1.dcm"))
    bad.write_bytes(b"\x00" * 10)
    exe = Path(sys.executable).parent / "mammodp"
    proc = subprocess.run(
        [str(exe), "prepare", "--source", "cbis-ddsm", "--root", str(root), "--out", str(tmp_path / "o"),
         "--params", str(write_params(tmp_path))],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
