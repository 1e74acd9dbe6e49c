"""Splits: patient-disjoint, stratified, deterministic; the disjointness check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammodp.data.splits import assign_splits, check_patient_disjoint, split_train_val
from mammodp.errors import DataError


def patients_frame(n_patients: int = 200, seed: int = 1) -> pd.DataFrame:
    """1-3 lesions per patient; density and label per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        density = int(rng.integers(1, 5))
        label = int(rng.random() < 0.3 + 0.1 * density)
        for j in range(int(rng.integers(1, 4))):
            rows.append({"sample_id": f"s{i}_{j}", "patient_id": f"P_{i:05d}", "label": label, "breast_density": density})
    return pd.DataFrame(rows)


def test_train_val_is_patient_disjoint_and_sized():
    df = patients_frame()
    split = split_train_val(df, val_fraction=0.15, stratify="breast_density", seed=0)
    df = df.assign(split=split)
    check_patient_disjoint(df)
    val_patients = df.loc[df["split"] == "val", "patient_id"].nunique()
    assert val_patients == 30  # 15% of 200 patients


def test_train_val_is_stratified_by_density_and_label():
    df = patients_frame(400)
    df["split"] = split_train_val(df, val_fraction=0.2, stratify="breast_density", seed=3)
    per_patient = df.drop_duplicates("patient_id")
    for (density, label), grp in per_patient.groupby(["breast_density", "label"]):
        frac = (grp["split"] == "val").mean()
        # Largest-remainder apportionment: each stratum within one patient of its quota.
        assert abs((grp["split"] == "val").sum() - 0.2 * len(grp)) <= 1.0, (density, label, frac)


def test_split_is_deterministic_and_seed_dependent():
    df = patients_frame()
    a = split_train_val(df, val_fraction=0.15, stratify="breast_density", seed=0)
    b = split_train_val(df, val_fraction=0.15, stratify="breast_density", seed=0)
    c = split_train_val(df, val_fraction=0.15, stratify="breast_density", seed=1)
    assert a.equals(b) and not a.equals(c)


def test_missing_stratify_values_and_tiny_strata():
    df = pd.DataFrame(
        {
            "patient_id": ["a", "b", "c", "d", "e"],
            "label": [0, 1, 0, 1, 0],
            "breast_density": [1, pd.NA, 3, 4, pd.NA],
        }
    )
    split = split_train_val(df, val_fraction=0.4, stratify="breast_density", seed=0)
    assert (split == "val").sum() == 2 and (split == "train").sum() == 3


def test_unknown_stratify_column_names_the_setting():
    with pytest.raises(DataError, match="prepare.stratify"):
        split_train_val(patients_frame(10), val_fraction=0.2, stratify="nope", seed=0)


def test_assign_splits_keeps_official_test_and_drops_overlap_from_train():
    train = patients_frame(40)
    test = pd.DataFrame(
        {"sample_id": ["t1", "t2"], "patient_id": ["P_00003", "X_1"], "label": [0, 1], "breast_density": [2, 3]}
    )
    out, overlap = assign_splits(train, test, val_fraction=0.15, stratify="breast_density", seed=0)
    assert overlap == ["P_00003"]
    assert set(out.loc[out["patient_id"] == "P_00003", "split"]) == {"test"}
    assert set(out["split"]) == {"train", "val", "test"}
    check_patient_disjoint(out)


def test_check_patient_disjoint_names_the_patient():
    df = pd.DataFrame({"patient_id": ["a", "b", "b"], "split": ["train", "train", "val"]})
    with pytest.raises(DataError, match="patient b .*train, val"):
        check_patient_disjoint(df)
