"""The validation suite: a clean manifest passes, and each corruption fails exactly its check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammodp.data.imageio import save_patch
from mammodp.data.validation import (
    MAX_EXAMPLES,
    REQUIRED_COLUMNS,
    ValidationReport,
    validate_manifest,
)

SHAPE = (32, 32)
BOUNDS = dict(min_class_fraction=0.2, intensity_mean=(0.05, 0.95), intensity_std_min=0.01)


def make_set(root: Path, n: int = 12) -> pd.DataFrame:
    """n patches (one patient each) over train/val/test; every split half malignant.

    Row i is in split ("train", "val", "test")[i % 3] with label (i // 3) % 2, so rows
    0, 3, 6, 9 are train with labels 0, 1, 0, 1.
    """
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = (i // 3) % 2
        pathology = "MALIGNANT" if label else ("BENIGN", "BENIGN_WITHOUT_CALLBACK")[i % 2]
        save_patch(root / "patches" / f"{i:03d}.png", rng.uniform(0.2, 0.8, SHAPE))
        rows.append(dict(
            sample_id=f"S{i:03d}", patient_id=f"P{i:03d}", split=("train", "val", "test")[i % 3],
            label=label, pathology=pathology, image_path=f"patches/{i:03d}.png",
            source="cbis-ddsm", breast_density=1 + i % 4,
        ))
    return pd.DataFrame(rows)


@pytest.fixture
def clean(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    return make_set(tmp_path), tmp_path


def run(df: pd.DataFrame, root: Path, **kw) -> ValidationReport:
    return validate_manifest(df, root, progress=False, **{"expected_shape": SHAPE, **BOUNDS, **kw})


def failed(df: pd.DataFrame, root: Path, **kw) -> set[str]:
    return {r.name for r in run(df, root, **kw).failed}


def result(report: ValidationReport, name: str):
    return next(r for r in report.results if r.name == name)


def test_clean_manifest_passes(clean):
    df, root = clean
    report = run(df, root)
    assert report.success, [r.to_dict() for r in report.failed]
    assert report.n_rows == len(df)
    names = [r.name for r in report.results]
    assert len(names) == len(set(names))  # names identify expectations in messages
    # The JSON form is plain data: it round-trips through json without a custom encoder.
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["statistics"] == {"evaluated": len(names), "successful": len(names), "failed": 0}
    assert result(report, "images_exist").observed["element_count"] == len(df)


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
def test_null_value_fails_only_not_null(clean, column):
    df, root = clean
    df[column] = df[column].astype(object)
    df.loc[4, column] = None
    assert failed(df, root) == {f"expect_column_values_to_not_be_null({column})"}


def test_missing_column_fails_closed(clean):
    df, root = clean
    report = run(df.drop(columns=["source"]), root)
    assert {r.name for r in report.failed} == {
        "required_columns_present", "expect_column_values_to_not_be_null(source)"}
    assert result(report, "required_columns_present").observed == {"missing": ["source"]}
    assert "source" in result(report, "expect_column_values_to_not_be_null(source)").error


def test_label_outside_0_1(clean):
    df, root = clean
    df.loc[0, "label"] = 2  # row 0 is BENIGN: still consistent with "not malignant"
    report = run(df, root)
    assert {r.name for r in report.failed} == {"expect_column_values_to_be_in_set(label)"}
    example = result(report, "expect_column_values_to_be_in_set(label)").unexpected_examples[0]
    assert example["sample_id"] == "S000" and example["label"] == 2


def test_unknown_pathology(clean):
    df, root = clean
    df.loc[0, "pathology"] = "ATYPICAL"
    assert failed(df, root) == {"expect_column_values_to_be_in_set(pathology)"}


def test_unknown_split(clean):
    df, root = clean
    df.loc[[0, 3], "split"] = "holdout"  # one benign, one malignant: balanced on its own
    assert failed(df, root) == {"expect_column_values_to_be_in_set(split)"}


def test_label_contradicts_pathology(clean):
    df, root = clean
    df.loc[0, "pathology"] = "MALIGNANT"  # label stays 0
    assert failed(df, root) == {"label_matches_pathology"}


def test_duplicate_sample_id(clean):
    df, root = clean
    df.loc[1, "sample_id"] = df.loc[0, "sample_id"]
    report = run(df, root)
    assert {r.name for r in report.failed} == {"expect_column_values_to_be_unique(sample_id)"}
    assert result(report, "expect_column_values_to_be_unique(sample_id)").observed[
        "unexpected_count"] == 2


def test_missing_image_file(clean):
    df, root = clean
    (root / df.loc[0, "image_path"]).unlink()
    assert failed(df, root) == {"images_exist"}


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_undecodable_image(clean, damage):
    df, root = clean
    path = root / df.loc[0, "image_path"]
    data = path.read_bytes()
    path.write_bytes(b"not a png at all" * 8 if damage == "garbage" else data[: len(data) // 2])
    assert failed(df, root) == {"images_decode"}


def test_wrong_shape(clean):
    df, root = clean
    save_patch(root / df.loc[0, "image_path"], np.random.default_rng(1).uniform(0.2, 0.8, (16, 24)))
    report = run(df, root)
    assert {r.name for r in report.failed} == {"images_have_expected_shape"}
    assert result(report, "images_have_expected_shape").unexpected_examples[0]["shape"] == "16x24"


def test_expected_shape_is_an_argument(clean):
    df, root = clean
    assert failed(df, root, expected_shape=(64, 64)) == {"images_have_expected_shape"}


def test_patient_in_two_splits(clean):
    df, root = clean
    df.loc[1, "patient_id"] = df.loc[0, "patient_id"]  # row 0 train, row 1 val
    report = run(df, root)
    assert {r.name for r in report.failed} == {"patients_disjoint_across_splits"}
    examples = result(report, "patients_disjoint_across_splits").unexpected_examples
    assert {e["patient_id"] for e in examples} == {"P000"}
    assert {e["split"] for e in examples} == {"train", "val"}


@pytest.mark.parametrize("label", [0, 1])
def test_class_imbalance(clean, label):
    df, root = clean
    train = df["split"] == "train"
    df.loc[train, "label"] = label
    df.loc[train, "pathology"] = "MALIGNANT" if label else "BENIGN"
    report = run(df, root)
    assert {r.name for r in report.failed} == {"class_balance_per_split"}
    examples = result(report, "class_balance_per_split").unexpected_examples
    assert {e["split"] for e in examples} == {"train"}
    assert {e["split_malignant_fraction"] for e in examples} == {float(label)}


def test_class_fraction_bound_is_an_argument(clean):
    df, root = clean
    assert failed(df, root, min_class_fraction=0.0) == set()
    df.loc[0, "label"], df.loc[0, "pathology"] = 1, "MALIGNANT"  # train 3/4 malignant
    assert failed(df, root, min_class_fraction=0.2) == set()
    assert failed(df, root, min_class_fraction=0.3) == {"class_balance_per_split"}


def test_blank_patch(clean):
    df, root = clean
    save_patch(root / df.loc[0, "image_path"], np.full(SHAPE, 0.5))
    assert failed(df, root) == {"intensity_std_above_min"}


@pytest.mark.parametrize("low, high", [(0.96, 1.0), (0.0, 0.04)])  # too bright, too dark
def test_mean_intensity_out_of_bounds(clean, low, high):
    df, root = clean
    save_patch(root / df.loc[0, "image_path"], np.random.default_rng(2).uniform(low, high, SHAPE))
    assert failed(df, root) == {"intensity_mean_in_bounds"}


def test_empty_manifest(clean):
    df, root = clean
    assert failed(df.iloc[:0], root) == {"manifest_not_empty"}


def test_examples_are_capped(clean):
    df, root = clean
    big = pd.concat([df.assign(sample_id=df["sample_id"] + f"-{k}") for k in range(3)],
                    ignore_index=True)
    big["image_path"] = "patches/nope.png"
    report = run(big, root)
    assert {r.name for r in report.failed} == {"images_exist"}
    exist = result(report, "images_exist")
    assert exist.observed["unexpected_count"] == len(big) > MAX_EXAMPLES
    assert len(exist.unexpected_examples) == MAX_EXAMPLES


def test_bad_bounds_are_rejected(clean):
    df, root = clean
    with pytest.raises(ValueError, match="min_class_fraction"):
        run(df, root, min_class_fraction=0.5)
    with pytest.raises(ValueError, match="intensity_mean"):
        run(df, root, intensity_mean=(0.9, 0.1))
