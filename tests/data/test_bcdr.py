"""BCDR importer on tiny hand-built subsets, one quirk per test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammodp.data import bcdr
from mammodp.data.patches import PatchGeometry
from mammodp.errors import DataError

H, W = 48, 64
GEOMETRY = PatchGeometry(margin=4, min_size=16, patch_size=16)
HEADER = (
    "patient_id, study_id, series, lesion_id, segmentation_id, image_view, image_filename, "
    "lw_x_points, lw_y_points, mammography_type, mammography_nodule, mammography_calcification, "
    "mammography_microcalcification, mammography_axillary_adenopathy, "
    "mammography_architectural_distortion, mammography_stroma_distortion, age, density, classification"
)


def square_outline(cx: int, cy: int, r: int) -> tuple[str, str]:
    """An outline as BCDR writes it: space-separated integers, string starting with a space."""
    xs = [cx - r, cx + r, cx + r, cx - r]
    ys = [cy - r, cy - r, cy + r, cy + r]
    return " " + " ".join(map(str, xs)), " " + " ".join(map(str, ys))


def write_image(path: Path, centre: tuple[int, int], seed: int = 0, suffix_mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(10, 40, (H, W)).astype(np.uint8)
    cy, cx = centre
    img[cy - 5 : cy + 6, cx - 5 : cx + 6] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert(suffix_mode).save(path)


def row(patient, study, lesion, view, filename, centre, *, nodule=1, density=" 2", age=" 55", cls=" Benign") -> str:
    xs, ys = square_outline(centre[1], centre[0], 5)
    fields = [
        f"{patient}", f" {study}", " 1", f" {lesion}", " 1", f" {view}", f" {filename}", xs, ys, " 1",
        f" {nodule}", " 0", " 0", " 0", " 0", " 0", age, density, cls,
    ]
    return ",".join(fields)


def build(root: Path, subset: str = "D01", rows: list[str] | None = None, folder: str | None = None) -> Path:
    folder = folder or f"BCDR-{subset}_dataset"
    base = root / folder
    base.mkdir(parents=True, exist_ok=True)
    if rows is None:
        write_image(base / "patient_3/study_4/img_3_4_1_RCC.tif", (20, 30), seed=1)
        write_image(base / "patient_3/study_4/img_3_4_1_RMLO.tif", (25, 20), seed=2)
        write_image(base / "patient_7/study_9/img_7_9_1_LCC.png", (24, 40), seed=3)
        rows = [
            row(3, 4, 1, 1, "patient_3/study_4/img_3_4_1_RCC.tif", (20, 30), cls=" Malign "),
            row(3, 4, 1, 3, "patient_3/study_4/img_3_4_1_RMLO.tif", (25, 20), cls="MALIGN", density=" N/A"),
            row(7, 9, 2, 2, "patient_7/study_9/img_7_9_1_LCC.png", (24, 40), cls="benign "),
            # a calcification outline on the same image: not a mass, skipped
            row(7, 9, 3, 2, "patient_7/study_9/img_7_9_1_LCC.png", (10, 10), nodule=0, cls=" Weird"),
        ]
    csv = base / f"bcdr_{subset.lower()}_outlines.csv"
    csv.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    return csv


def import_all(root: Path, skip: bool = False):
    tasks, skipped = bcdr.plan(root, skip_missing=skip)
    rows, patches = [], []
    for task in tasks:
        res = bcdr.process_image(task, GEOMETRY, skip_errors=skip)
        rows += res.rows
        patches += res.patches
        skipped += res.skipped
    return rows, patches, skipped


def centre_is_bright(patch: np.ndarray) -> bool:
    c = patch.shape[0] // 2
    return patch[c - 1 : c + 1, c - 1 : c + 1].min() > 0.8 and patch[0, 0] < 0.3


def test_quirky_csv_imports(tmp_path):
    build(tmp_path)
    rows, patches, skipped = import_all(tmp_path)
    assert not skipped and len(rows) == 3  # the nodule == 0 row is not a mass
    by_id = {r["sample_id"]: r for r in rows}
    rcc = by_id["bcdr-d01-3-4-1-RCC"]
    assert (rcc["patient_id"], rcc["split"], rcc["source"]) == ("bcdr-d01/3", "external", "bcdr")
    assert (rcc["label"], rcc["pathology"], rcc["view"], rcc["laterality"]) == (1, "MALIGNANT", "CC", "RIGHT")
    assert rcc["breast_density"] == 2 and rcc["age"] == 55.0
    assert rcc["source_file"] == "BCDR-D01_dataset/patient_3/study_4/img_3_4_1_RCC.tif"
    rmlo = by_id["bcdr-d01-3-4-1-RMLO"]
    assert rmlo["breast_density"] is pd.NA and rmlo["label"] == 1 and rmlo["view"] == "MLO"
    lcc = by_id["bcdr-d01-7-9-2-LCC"]
    assert (lcc["label"], lcc["pathology"], lcc["laterality"]) == (0, "BENIGN", "LEFT")
    assert all(centre_is_bright(p) for p in patches)


def test_parse_points_with_leading_space():
    assert bcdr.parse_points(" 12 15  19") == (12, 15, 19)
    assert bcdr.parse_points("") == ()


def test_outline_mask_rasterises_polygon():
    mask = bcdr.outline_mask((10, 20, 20, 10), (5, 5, 15, 15), (H, W))
    assert mask[5:16, 10:21].all() and mask.sum() == 11 * 11


def test_unknown_classification_names_csv_and_value(tmp_path):
    base = tmp_path / "BCDR-D02_dataset"
    write_image(base / "a.tif", (20, 30))
    csv = build(tmp_path, "D02", rows=[row(1, 1, 1, 1, "a.tif", (20, 30), cls=" Unsure")])
    with pytest.raises(DataError, match="unknown classification 'Unsure'") as info:
        bcdr.plan(tmp_path)
    assert str(info.value).startswith(str(csv))


def test_patient_ids_prefixed_by_subset_and_all_subsets_found(tmp_path):
    write_image(tmp_path / "BCDR-F03" / "x" / "img.tif", (20, 30), seed=5)
    build(tmp_path, "F03", rows=[row(3, 1, 1, 4, "x/img.tif", (20, 30))], folder="BCDR-F03")
    write_image(tmp_path / "BCDR-D01_dataset" / "y.tif", (24, 40), seed=6)
    build(tmp_path, "D01", rows=[row(3, 1, 1, 4, "y.tif", (24, 40))])
    rows, _, _ = import_all(tmp_path)
    assert sorted(r["patient_id"] for r in rows) == ["bcdr-d01/3", "bcdr-f03/3"]


def test_exact_duplicate_patches_are_dropped(tmp_path):
    base = tmp_path / "BCDR-D01_dataset"
    write_image(base / "a.tif", (20, 30), seed=1)
    write_image(base / "b.tif", (20, 30), seed=1)  # the same image saved twice
    write_image(base / "c.tif", (20, 30), seed=2)
    build(tmp_path, rows=[row(1, 1, 1, 1, f, (20, 30)) for f in ("a.tif", "b.tif")] + [row(2, 1, 1, 1, "c.tif", (20, 30))])
    rows, patches, _ = import_all(tmp_path)
    assert len(rows) == 3  # two rows of patient 1, view 1, lesion 1: kept apart by a suffix
    assert sorted(r["sample_id"] for r in rows) == ["bcdr-d01-1-1-1-RCC", "bcdr-d01-1-1-1-RCC-2", "bcdr-d01-2-1-1-RCC"]
    kept_rows, kept, dropped = bcdr.drop_exact_duplicates(rows, patches)
    assert dropped == 1 and len(kept) == 2
    assert [r["sample_id"] for r in kept_rows] == ["bcdr-d01-1-1-1-RCC", "bcdr-d01-2-1-1-RCC"]


def test_missing_image_names_it(tmp_path):
    build(tmp_path, rows=[row(1, 1, 1, 1, "missing.tif", (20, 30))])
    with pytest.raises(DataError, match="missing.tif"):
        bcdr.plan(tmp_path)
    rows, _, skipped = import_all(tmp_path, skip=True)
    assert not rows and skipped[0]["file"].endswith("missing.tif")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's own complaint about the junk file
def test_corrupt_image_names_it(tmp_path):
    base = tmp_path / "BCDR-D01_dataset"
    base.mkdir()
    (base / "bad.tif").write_bytes(b"II*\x00 not really a tiff")
    build(tmp_path, rows=[row(1, 1, 1, 1, "bad.tif", (20, 30))])
    tasks, _ = bcdr.plan(tmp_path)
    with pytest.raises(DataError, match="bad.tif"):
        bcdr.process_image(tasks[0], GEOMETRY)


def test_rgb_png_is_read_as_grey(tmp_path):
    write_image(tmp_path / "rgb.png", (20, 30), suffix_mode="RGB")
    img = bcdr.read_image(tmp_path / "rgb.png")
    assert img.shape == (H, W) and img.max() == 1.0 and img[20, 30] == 1.0


def test_no_outline_csv_names_root(tmp_path):
    with pytest.raises(DataError, match="bcdr_"):
        bcdr.plan(tmp_path)
