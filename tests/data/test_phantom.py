"""The built-in phantom: determinism, the real formats' quirks, and a real class signal."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from PIL import Image, ImageDraw
from scipy.spatial import ConvexHull
from typer.testing import CliRunner

from mammodp.config import Config, PhantomConfig
from mammodp.data import phantom
from mammodp.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SMALL = PhantomConfig(
    seed=3,
    cbis_train_patients=6,
    cbis_test_patients=3,
    bcdr_patients=4,
    image_height=256,
    image_width=160,
    mass_radius=(6.0, 14.0),
)
STUDY_DIR = re.compile(r"^\d{2}-\d{2}-\d{4}-DDSM-\d{5}$")
SERIES_DIR = re.compile(r"^1\.000000-(full mammogram images|ROI mask images|cropped images)-\d{5}$")


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file below root, keyed by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, phantom.PhantomSummary]:
    root = tmp_path_factory.mktemp("phantom")
    return root, phantom.write_phantom(root, SMALL)


@pytest.fixture(scope="module")
def dicoms(small) -> dict[tuple[str, str], list[tuple[Path, pydicom.Dataset]]]:
    """Every DICOM of the CBIS tree, by (StudyInstanceUID, SeriesInstanceUID) as an importer indexes them."""
    root, _ = small
    index: dict[tuple[str, str], list] = {}
    for p in sorted((root / "cbis-ddsm" / "CBIS-DDSM").rglob("*.dcm")):
        ds = pydicom.dcmread(p)
        index.setdefault((ds.StudyInstanceUID, ds.SeriesInstanceUID), []).append((p, ds))
    return index


def cbis_csv(root: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(root / "cbis-ddsm" / f"mass_case_description_{split}_set.csv", dtype=str)


def uids_of(cell: str) -> tuple[str, str]:
    folder, study, series, _ = cell.strip().split("/")
    return study, series


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_a_byte_identical_tree_and_another_seed_differs(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    phantom.write_phantom(again, SMALL)
    first, second = tree_digest(root), tree_digest(again)
    assert len(first) > 30 and first == second

    other = tmp_path / "other"
    phantom.write_phantom(other, replace(SMALL, seed=4))
    third = tree_digest(other)
    csv = "cbis-ddsm/mass_case_description_train_set.csv"
    assert third[csv] != first[csv]
    assert not set(first.values()) & {v for k, v in third.items() if k.endswith((".dcm", ".png"))}


def test_rendering_in_worker_processes_writes_the_same_bytes(small, tmp_path):
    """`workers` (prepare.workers) renders patients in processes: same tree, same progress count."""
    root, _ = small
    ticks = []
    parallel = tmp_path / "parallel"
    phantom.write_phantom(parallel, SMALL, progress=ticks.append, workers=2)
    assert tree_digest(parallel) == tree_digest(root)
    assert len(ticks) == SMALL.cbis_train_patients + SMALL.cbis_test_patients + SMALL.bcdr_patients


# --------------------------------------------------------------------------- CBIS-DDSM


def test_cbis_csvs_have_the_real_columns_and_newline_terminated_path_cells(small):
    root, summary = small
    for split in ("train", "test"):
        df = cbis_csv(root, split)
        assert tuple(df.columns) == phantom.CBIS_COLUMNS
        assert len(df) == summary.cbis_rows[split]
        assert df["patient_id"].str.fullmatch(r"P_\d{5}").all()
        assert set(df["abnormality type"]) == {"mass"}
        assert set(df["left or right breast"]) <= {"LEFT", "RIGHT"}
        assert set(df["image view"]) <= {"CC", "MLO"}
        assert set(df["pathology"]) <= {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"}
        assert {"MALIGNANT"} < set(df["pathology"])  # both classes, even in a tiny set
        assert df["breast_density"].astype(int).between(1, 4).all()
        assert df["assessment"].astype(int).between(2, 5).all()
        assert df["subtlety"].astype(int).between(1, 5).all()
        for col in ("cropped image file path", "ROI mask file path"):
            assert df[col].str.endswith(".dcm\n").all()
        prefix = "Mass-Training_" if split == "train" else "Mass-Test_"
        expected = prefix + df["patient_id"] + "_" + df["left or right breast"] + "_" + df["image view"]
        assert (df["image file path"].str.split("/").str[0] == expected).all()
        assert df["image file path"].str.endswith("/000000.dcm").all()
        roi_folder = df["ROI mask file path"].str.split("/").str[0]
        assert (roi_folder == expected + "_" + df["abnormality id"]).all()
        # several abnormalities share one image file path; some patients have both views
        assert df.groupby("image file path").size().max() == 2
        assert df.groupby("patient_id")["image view"].nunique().max() == 2
    train, test = cbis_csv(root, "train"), cbis_csv(root, "test")
    assert not set(train["patient_id"]) & set(test["patient_id"])


def test_shape_and_margin_descriptors_fit_the_drawn_masses(small):
    root, _ = small
    df = pd.concat([cbis_csv(root, "train"), cbis_csv(root, "test")])
    shapes = {"ROUND", "OVAL", "LOBULATED", "IRREGULAR", "ARCHITECTURAL_DISTORTION"}
    margins = {"CIRCUMSCRIBED", "OBSCURED", "ILL_DEFINED", "MICROLOBULATED", "SPICULATED"}
    assert set(df["mass shape"]) <= shapes and set(df["mass margins"]) <= margins
    rng = np.random.default_rng(0)
    drawn = [phantom.sample_lesion_shape(rng, i % 2 == 1, (10, 26), 0.5) for i in range(300)]
    for s in drawn:
        if s.margins == "SPICULATED":
            assert s.spicule_angles.size >= 4
        if s.mass_shape in ("ROUND", "OVAL"):
            assert np.abs(s.amps).sum() <= 0.09 + 1e-9
    spiculated = [s.irregularity for s in drawn if s.margins == "SPICULATED"]
    circumscribed = [s.irregularity for s in drawn if s.margins == "CIRCUMSCRIBED"]
    assert np.mean(spiculated) > np.mean(circumscribed) + 0.3


def test_files_lie_tcia_style_and_csv_rows_map_to_them_by_uid(small, dicoms):
    root, summary = small
    tree = root / "cbis-ddsm" / "CBIS-DDSM"
    files = sorted(tree.rglob("*"))
    dcm = [p for p in files if p.is_file()]
    assert dcm and all(p.name in ("1-1.dcm", "1-2.dcm") for p in dcm)
    for p in dcm:
        rel = p.relative_to(tree).parts
        assert len(rel) == 4 and STUDY_DIR.match(rel[1]) and SERIES_DIR.match(rel[2])

    mono, full_images = [], set()
    separate_crop_series, swapped = 0, 0
    for split in ("train", "test"):
        for row in cbis_csv(root, split).to_dict("records"):
            (full_path, full), = dicoms[uids_of(row["image file path"])]
            full_images.add(full_path)
            assert full.Modality == "MG" and full.BitsAllocated == 16 and full.BitsStored == 16
            assert full.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert (full.Rows, full.Columns) == (SMALL.image_height, SMALL.image_width)
            assert full.PatientID == full_path.relative_to(tree).parts[0] == row["image file path"].split("/")[0]
            assert full.SeriesDescription == "full mammogram images"
            mono.append(full.PhotometricInterpretation)

            roi = dicoms[uids_of(row["ROI mask file path"])] + dicoms[uids_of(row["cropped image file path"])]
            roi = list({p: ds for p, ds in roi}.items())
            assert len(roi) == 2
            separate_crop_series += uids_of(row["ROI mask file path"]) != uids_of(row["cropped image file path"])
            masks = [(p, ds) for p, ds in roi if set(np.unique(ds.pixel_array)) <= {0, 255}]
            crops = [(p, ds) for p, ds in roi if (p, ds) not in masks]
            assert len(masks) == 1 and len(crops) == 1
            (mask_path, mask), (crop_path, crop) = masks[0], crops[0]
            assert mask.BitsAllocated == 8 and mask.pixel_array.max() == 255
            assert abs(mask.Rows - full.Rows) <= 4 and abs(mask.Columns - full.Columns) <= 4
            assert crop.BitsAllocated == 16 and crop.Rows < full.Rows and crop.Columns < full.Columns
            assert mask.PatientID == crop.PatientID == row["ROI mask file path"].split("/")[0]
            assert mask_path.relative_to(tree).parts[0] == mask.PatientID
            if mask_path.parent == crop_path.parent:
                swapped += mask_path.name == "1-1.dcm"

            # the mask outlines a lesion brighter than its surroundings in the full image
            pixels = full.pixel_array.astype(np.float64)
            if full.PhotometricInterpretation == "MONOCHROME1":
                pixels = 65535.0 - pixels
            m = np.zeros(pixels.shape, dtype=bool)
            h, w = min(m.shape[0], mask.Rows), min(m.shape[1], mask.Columns)
            m[:h, :w] = mask.pixel_array[:h, :w] > 0
            ring = np.zeros_like(m)
            ys, xs = np.nonzero(m)
            ring[max(0, ys.min() - 12) : ys.max() + 13, max(0, xs.min() - 12) : xs.max() + 13] = True
            assert pixels[m].mean() > pixels[ring & ~m].mean()

    assert summary.cbis_images["train"] + summary.cbis_images["test"] == len(full_images)
    assert mono.count("MONOCHROME2") > mono.count("MONOCHROME1") >= 1
    assert separate_crop_series >= 1 and swapped >= 1
    off_size = [ds for group in dicoms.values() for _, ds in group if ds.BitsAllocated == 8]
    assert any((ds.Rows, ds.Columns) != (SMALL.image_height, SMALL.image_width) for ds in off_size)
    fulls = [ds for group in dicoms.values() for _, ds in group if ds.SeriesDescription == "full mammogram images"]
    assert any("RescaleSlope" not in ds for ds in fulls) and any(ds.get("RescaleSlope") == 1 for ds in fulls)


def test_breast_sits_against_the_chest_wall_of_its_side(small, dicoms):
    root, _ = small
    for row in cbis_csv(root, "train").to_dict("records"):
        (_, full), = dicoms[uids_of(row["image file path"])]
        pixels = full.pixel_array.astype(np.float64)
        if full.PhotometricInterpretation == "MONOCHROME1":
            pixels = 65535.0 - pixels
        left, right = pixels[:, :8].mean(), pixels[:, -8:].mean()
        background = pixels[pixels < 0.02 * 65535]
        assert background.size > 0.1 * pixels.size  # background near 0 around the breast
        assert (left > right) == (row["left or right breast"] == "LEFT")


# --------------------------------------------------------------------------- BCDR


def test_bcdr_layout_and_quirks(small):
    root, summary = small
    bcdr = root / "bcdr"
    frames = []
    for subset in phantom.BCDR_SUBSETS:
        folder = bcdr / f"BCDR-{subset}_dataset"
        df = pd.read_csv(folder / f"bcdr_{subset.lower()}_outlines.csv", dtype=str, keep_default_na=False)
        assert tuple(df.columns) == phantom.BCDR_COLUMNS
        assert len(df) == summary.bcdr_rows[subset]
        for name in df["image_filename"]:
            assert name.startswith(" patient_") and name.endswith(".png")
            with Image.open(folder / name.strip()) as im:
                assert im.mode == "L"
                expected = (round(SMALL.image_width * SMALL.bcdr_scale), round(SMALL.image_height * SMALL.bcdr_scale))
                assert im.size == expected
        frames.append(df)
    df = pd.concat(frames)
    assert set(df["image_view"].astype(int)) <= {1, 2, 3, 4}
    for col in ("lw_x_points", "lw_y_points"):
        assert df[col].str.fullmatch(r"( \d+){3,}").all()
    assert (df["lw_x_points"].str.split().str.len() == df["lw_y_points"].str.split().str.len()).all()
    assert (df["mammography_nodule"] == "0").any() and (df["mammography_nodule"] == "1").any()
    non_mass = df[df["mammography_nodule"] == "0"]
    calcs = non_mass[["mammography_calcification", "mammography_microcalcification"]] == "1"
    assert calcs.any(axis=1).all()
    assert " N/A" in set(df["density"])
    assert set(df.loc[df["density"] != " N/A", "density"]) <= {"1", "2", "3", "4"}
    cls = df["classification"]
    assert set(cls.str.strip().str.lower()) == {"benign", "malign"}
    assert (cls != cls.str.strip()).any()  # stray whitespace
    lowercase = cls.str.strip().str.lower() == cls.str.strip()
    assert lowercase.any() and not lowercase.all()  # "benign" beside "Benign"


def test_bcdr_is_acquired_in_another_style_than_cbis():
    for style in phantom.BCDR_STYLES.values():
        assert style.gamma != phantom.CBIS_STYLE.gamma
        assert style.noise > phantom.CBIS_STYLE.noise
        assert style.texture_beta != phantom.CBIS_STYLE.texture_beta


def test_outline_polygon_matches_the_lesion_mask():
    rng = np.random.default_rng(1)
    for malignant in (False, True):
        for _ in range(10):
            shape = phantom.sample_lesion_shape(rng, malignant, (8, 20), 0.5)
            place = phantom.LesionPlacement(cy=50.0, cx=60.0, scale=0.75, rotation=0.3)
            mask = phantom.lesion_mask(shape, place, (100, 120))
            xs, ys = phantom.lesion_outline(shape, place)
            canvas = Image.new("L", (120, 100), 0)
            ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist())), fill=1, outline=1)
            poly = np.asarray(canvas) > 0
            iou = (poly & mask).sum() / (poly | mask).sum()
            assert iou > 0.85


# --------------------------------------------------------------------------- signal


def solidity_and_circularity(mask: np.ndarray) -> tuple[float, float]:
    """Area over convex-hull area (pixel corners), and 4 pi A / P^2 with P counted on pixel edges."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    area = float(mask.sum())
    m = np.pad(mask, 1).astype(np.int8)
    perimeter = float(np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum())
    return area / ConvexHull(corners).volume, 4 * math.pi * area / perimeter**2


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC (label 1 positive)."""
    order = np.argsort(np.argsort(scores))
    pos = labels.astype(bool)
    return float((order[pos].sum() - pos.sum() * (pos.sum() - 1) / 2) / (pos.sum() * (~pos).sum()))


def shape_features(difficulty: float, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    labels = np.arange(n) % 2
    sol, circ = [], []
    for y in labels:
        s = phantom.sample_lesion_shape(rng, bool(y), (10, 26), difficulty)
        mask = phantom.lesion_mask(s, phantom.LesionPlacement(64.0, 64.0, 1.0, 0.0), (128, 128))
        a, b = solidity_and_circularity(mask)
        sol.append(a)
        circ.append(b)
    return labels, np.array(sol), np.array(circ)


def test_malignant_masses_are_less_solid_and_less_circular():
    labels, sol, circ = shape_features(0.5)
    assert sol[labels == 1].mean() < sol[labels == 0].mean() - 0.02
    assert circ[labels == 1].mean() < circ[labels == 0].mean()
    # overlapping, not separable: the shape alone is a good but imperfect cue at 0.5
    assert 0.7 < auroc(-sol, labels) < 0.97


@pytest.mark.parametrize(("difficulty", "low", "high"), [(0.0, 0.95, 1.0), (1.0, 0.35, 0.65)])
def test_difficulty_sets_how_far_the_classes_overlap(difficulty, low, high):
    labels, sol, _ = shape_features(difficulty)
    assert low <= auroc(-sol, labels) <= high


def test_masks_on_disk_differ_by_pathology(tmp_path):
    # difficulty 0 keeps the classes apart, so a handful of masks shows the direction reliably
    root = tmp_path / "easy"
    phantom.write_phantom(root, replace(SMALL, difficulty=0.0, seed=5))
    index = {}
    for p in (root / "cbis-ddsm" / "CBIS-DDSM").rglob("*.dcm"):
        ds = pydicom.dcmread(p)
        if ds.BitsAllocated == 8:
            index[(ds.StudyInstanceUID, ds.SeriesInstanceUID)] = ds.pixel_array > 0
    sol = {True: [], False: []}
    for split in ("train", "test"):
        for row in cbis_csv(root, split).to_dict("records"):
            mask = index.get(uids_of(row["ROI mask file path"]), index.get(uids_of(row["cropped image file path"])))
            sol[row["pathology"] == "MALIGNANT"].append(solidity_and_circularity(mask)[0])
    assert sol[True] and sol[False]
    assert max(sol[True]) < min(sol[False]) + 0.05 and np.mean(sol[True]) < np.mean(sol[False]) - 0.05


def test_attributes_depend_mildly_on_pathology():
    cfg = replace(SMALL, cbis_train_patients=400)
    rng = np.random.default_rng(0)
    pats = [phantom._sample_patient(rng, i, cfg, i % 2 == 1, i % 3 == 0) for i in range(cfg.cbis_train_patients)]
    lesions = [les for p in pats for les in p.lesions]
    age = {m: np.mean([p.age for p in pats if p.malignant == m]) for m in (True, False)}
    assessment = {m: np.mean([les.assessment for les in lesions if les.malignant == m]) for m in (True, False)}
    assert age[True] > age[False] + 3
    assert assessment[True] > assessment[False] + 0.8


# --------------------------------------------------------------------------- config, stage, CLI


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"difficulty": 1.5}, "phantom.difficulty"),
        ({"bcdr_patients": 1}, "phantom.bcdr_patients"),
        ({"mass_radius": (30.0, 10.0)}, "phantom.mass_radius"),
        ({"cbis_test_patients": 0}, "phantom.cbis_test_patients"),
    ],
)
def test_bad_settings_are_rejected_by_name(tmp_path, change, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        phantom.write_phantom(tmp_path, replace(SMALL, **change))


def test_stage_is_atomic_and_respects_if_missing(tmp_path, capsys):
    from mammodp.stages import phantom as stage

    out = tmp_path / "raw"
    with pytest.raises(ConfigError):
        stage.run(Config(phantom=replace(SMALL, difficulty=2.0)), out=out)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written

    stage.run(Config(phantom=SMALL), out=out)
    before = tree_digest(out)
    assert (out / "PHANTOM.md").is_file() and (out / "cbis-ddsm").is_dir() and (out / "bcdr").is_dir()
    stage.run(Config(phantom=replace(SMALL, seed=9)), out=out, if_missing=True)
    assert "--if-missing" in capsys.readouterr().out
    assert tree_digest(out) == before


def small_params(path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["phantom"].update(
        cbis_train_patients=SMALL.cbis_train_patients,
        cbis_test_patients=SMALL.cbis_test_patients,
        bcdr_patients=SMALL.bcdr_patients,
        image_height=SMALL.image_height,
        image_width=SMALL.image_width,
        mass_radius=list(SMALL.mass_radius),
    )
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_cli_writes_a_phantom_the_real_importers_read(tmp_path):
    from mammodp.cli import app

    params = small_params(tmp_path / "params_small.yaml")
    out = tmp_path / "raw"
    runner = CliRunner()
    result = runner.invoke(app, ["phantom", "--out", str(out), "-p", str(params)])
    assert result.exit_code == 0, result.output
    assert "phantom: wrote" in result.output
    text = (out / "PHANTOM.md").read_text()
    assert "synthetic" in text and re.search(r"20\d\d-\d\d-\d\d", text) is None  # no timestamp

    result = runner.invoke(app, ["phantom", "--out", str(out), "--if-missing", "-p", str(params)])
    assert result.exit_code == 0 and "--if-missing" in result.output

    # the importers read it like real data: one patch per mass row
    for source, csvs in (("cbis-ddsm", "mass_case_description_*_set.csv"), ("bcdr", "*/bcdr_*_outlines.csv")):
        prepared = tmp_path / "prepared" / source
        result = runner.invoke(
            app, ["prepare", "--source", source, "--root", str(out / source), "--out", str(prepared), "-p", str(params)]
        )
        assert result.exit_code == 0, result.output
        rows = pd.concat([pd.read_csv(p, dtype=str) for p in sorted((out / source).glob(csvs))])
        if source == "bcdr":
            rows = rows[rows["mammography_nodule"] == "1"]
        manifest = pd.read_parquet(prepared / "manifest.parquet")
        assert len(manifest) == len(rows)
        assert set(manifest["label"]) == {0, 1}
