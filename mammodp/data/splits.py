"""Patient-disjoint splits.

CBIS-DDSM's official train set is split into train/val by patient (REFERENCE: 85/15,
density-stratified); the official test set stays `test`. Stratification is done on
patients, not patches: each patient's stratum is (their most frequent value of the
stratify column, their majority label), and every stratum gives its share of patients to
val by largest-remainder apportionment, so even strata of one or two patients are handled
deterministically and the val fraction is met as closely as whole patients allow.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mammodp.data.manifest import normalise_id
from mammodp.errors import DataError


def check_patient_disjoint(df: pd.DataFrame) -> None:
    """Raise if any patient has rows in more than one split.

    Args:
        df: rows with `patient_id` and `split`.

    Raises:
        DataError: naming the first such patient (sorted) and its splits.
    """
    for col in ("patient_id", "split"):
        if col not in df.columns:
            raise DataError(f"cannot check patient disjointness: no {col!r} column", field=col)
    # Ids as normalised at import: 'P_00002 ' and 'P_00002' are one patient here.
    keys = df["patient_id"].map(normalise_id)
    per_patient = df.groupby(keys, sort=True)["split"].unique()
    for patient, splits in per_patient.items():
        if len(splits) > 1:
            names = ", ".join(sorted(map(str, splits)))
            raise DataError(f"patient {patient} is in more than one split ({names})", field="split")


def _patient_strata(df: pd.DataFrame, stratify: str | None) -> pd.Series:
    """One stratum key (str) per patient: most frequent stratify value + majority label."""

    def mode(values: pd.Series) -> str:
        v = values.dropna()
        if v.empty:
            return "NA"
        counts = v.astype(str).value_counts()
        return str(sorted(counts[counts == counts.max()].index)[0])  # ties: smallest, deterministic

    parts = []
    if stratify is not None:
        parts.append(df.groupby("patient_id", sort=True)[stratify].agg(mode))
    if "label" in df.columns:
        # Majority label; a tie (mixed patient) counts as malignant, the rarer finding.
        parts.append(df.groupby("patient_id", sort=True)["label"].mean().map(lambda m: str(int(m >= 0.5))))
    if not parts:
        return pd.Series("all", index=pd.Index(sorted(df["patient_id"].unique()), name="patient_id"))
    key = parts[0].astype(str)
    for extra in parts[1:]:
        key = key + "|" + extra
    return key


def split_train_val(
    df: pd.DataFrame, *, val_fraction: float, stratify: str | None, seed: int
) -> pd.Series:
    """Assign each row of a training set to `train` or `val`, disjoint by patient.

    Args:
        df: rows with `patient_id` (and `label`, and the `stratify` column if given).
        val_fraction: fraction of PATIENTS that go to val, in (0, 1).
        stratify: column to stratify on (None: label only).
        seed: RNG seed; the same inputs and seed give the same split.

    Returns:
        A Series of "train"/"val" aligned with `df.index`.

    Raises:
        DataError: the stratify column is missing, or there are fewer than 2 patients.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val fraction must be in (0, 1), got {val_fraction}", field="prepare.val_fraction")
    n_patients = df["patient_id"].nunique() if "patient_id" in df.columns else 0
    if n_patients < 2:
        raise DataError(f"need at least 2 training patients to split train/val, got {n_patients}",
                        field="patient_id")
    if stratify is not None and stratify not in df.columns:
        raise DataError(
            f"stratify column {stratify!r} not in the data; columns: {sorted(df.columns)}",
            field="prepare.stratify",
        )
    strata = _patient_strata(df, stratify)
    n_patients = len(strata)
    if n_patients < 2:
        raise DataError(f"need at least 2 patients to split train/val, got {n_patients}")
    n_val = min(max(int(round(val_fraction * n_patients)), 1), n_patients - 1)

    rng = np.random.default_rng(seed)
    groups = {k: sorted(v.index) for k, v in strata.groupby(strata, sort=True)}
    keys = sorted(groups)
    quota = {k: val_fraction * len(groups[k]) for k in keys}
    take = {k: math.floor(quota[k]) for k in keys}
    # Largest remainder first; the random key breaks ties so no stratum is always favoured.
    tiebreak = dict(zip(keys, rng.permutation(len(keys))))
    order = sorted(keys, key=lambda k: (-(quota[k] - take[k]), tiebreak[k]))
    shortfall = n_val - sum(take.values())
    for k in order:
        if shortfall <= 0:
            break
        if take[k] < len(groups[k]):
            take[k] += 1
            shortfall -= 1
    val_patients: set[str] = set()
    for k in keys:
        members = groups[k]
        picked = rng.permutation(len(members))[: take[k]]
        val_patients.update(members[i] for i in picked)
    return pd.Series(
        np.where(df["patient_id"].isin(val_patients), "val", "train"), index=df.index, dtype="string"
    )


def assign_splits(
    train: pd.DataFrame, test: pd.DataFrame, *, val_fraction: float, stratify: str | None, seed: int
) -> tuple[pd.DataFrame, list[str]]:
    """Split CBIS-style data: official test -> `test`, official train -> `train`/`val`.

    A patient present in both official sets keeps their test rows and loses their train
    rows, so the official test set stays intact and the result is patient-disjoint.

    Args:
        train: official training rows (`patient_id`, `label`, stratify column).
        test: official test rows.
        val_fraction: fraction of training patients held out for validation.
        stratify: column to stratify on.
        seed: split seed.

    Returns:
        (all rows with a `split` column, patient ids dropped from train because they are
        in test).
    """
    overlap = sorted(set(train["patient_id"]) & set(test["patient_id"]))
    kept = train[~train["patient_id"].isin(overlap)].copy()
    kept["split"] = split_train_val(kept, val_fraction=val_fraction, stratify=stratify, seed=seed)
    tst = test.copy()
    tst["split"] = "test"
    out = pd.concat([kept, tst], ignore_index=True)
    out["split"] = out["split"].astype("string")
    check_patient_disjoint(out)
    return out, overlap


__all__ = ["check_patient_disjoint", "split_train_val", "assign_splits"]
