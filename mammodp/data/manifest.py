"""The patch manifest: one row per patch, fixed columns and dtypes (docs/CONTRACTS.md).

Written as `manifest.parquet` (what stages read) and `manifest.csv` (for people) beside the
patches; `image_path` is relative to the manifest's folder so a prepared folder can move.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mammodp.errors import DataError
from mammodp.io import atomic_path

MANIFEST_NAME = "manifest.parquet"
CSV_NAME = "manifest.csv"

#: Columns every manifest has (validation checks them).
REQUIRED_COLUMNS: list[str] = [
    "sample_id",
    "patient_id",
    "split",
    "label",
    "pathology",
    "image_path",
    "source",
]
#: Attributes a source fills where it knows them (null otherwise).
ATTRIBUTE_COLUMNS: list[str] = ["breast_density", "age", "view", "laterality", "assessment", "subtlety"]
#: Provenance: the raw file a patch was cut from, relative to the import root.
PROVENANCE_COLUMNS: list[str] = ["source_file"]
COLUMNS: list[str] = REQUIRED_COLUMNS + ATTRIBUTE_COLUMNS + PROVENANCE_COLUMNS

#: pandas dtypes. Text is the nullable "string" dtype, integers that may be missing "Int64".
DTYPES: dict[str, str] = {
    "sample_id": "string",
    "patient_id": "string",
    "split": "string",
    "label": "int64",
    "pathology": "string",
    "image_path": "string",
    "source": "string",
    "breast_density": "Int64",
    "age": "float64",
    "view": "string",
    "laterality": "string",
    "assessment": "Int64",
    "subtlety": "Int64",
    "source_file": "string",
}

SPLITS: tuple[str, ...] = ("train", "val", "test", "external")
PATHOLOGIES: tuple[str, ...] = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")
#: pathology -> label (1 = malignant, the positive class).
PATHOLOGY_LABEL: dict[str, int] = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
VIEWS: tuple[str, ...] = ("CC", "MLO")
LATERALITIES: tuple[str, ...] = ("LEFT", "RIGHT")
#: Absolute image path column added by `read_manifest` (never written to disk).
ABS_PATH_COLUMN = "abs_path"


def normalise_id(value: object) -> str:
    """An identifier as every manifest stores it: surrounding whitespace stripped, inner runs of
    whitespace made one space (`' P_00002 '` -> `'P_00002'`). Applied once, by the importers;
    validation rejects ids that are empty or not in this form."""
    return " ".join(str(value).split()) if value is not None and not pd.isna(value) else ""


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True when `path`, made absolute and normalised (`..` resolved, symlinks not followed),
    lies in or below `root`: a CSV cell cannot lead an import outside its data root."""
    import os

    p = os.path.normpath(os.path.abspath(path))
    r = os.path.normpath(os.path.abspath(root))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def manifest_path(data_dir: str | Path, source: str | None = None) -> Path:
    """Where a data set's manifest lives: the one place this path is built.

    Args:
        data_dir: `data.prepared_dir` (with `source`) or a data set's own folder such as
            `data.synthetic_dir` (without).
        source: prepared set's folder name under `data_dir` (`cbis`, `bcdr`), or None.

    Returns:
        `<data_dir>/<source>/manifest.parquet`, or `<data_dir>/manifest.parquet`.
    """
    folder = Path(data_dir) if source is None else Path(data_dir) / source
    return folder / MANIFEST_NAME


def coerce_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with the manifest's columns in order and dtypes fixed.

    Missing attribute/provenance columns are added as null; extra columns are kept after
    the known ones. Raises `DataError` if a required column is missing or a value cannot
    take its column's dtype.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"manifest lacks required columns {missing}")
    out = df.copy()
    for col in ATTRIBUTE_COLUMNS + PROVENANCE_COLUMNS:
        if col not in out.columns:
            out[col] = pd.NA
    for col, dtype in DTYPES.items():
        try:
            if dtype == "Int64":
                out[col] = pd.to_numeric(out[col], errors="raise").astype("Int64")
            elif dtype == "float64":
                out[col] = pd.to_numeric(out[col], errors="raise").astype("float64")
            else:
                out[col] = out[col].astype(dtype)
        except (TypeError, ValueError) as exc:
            raise DataError(f"manifest column {col!r} cannot be {dtype}: {exc}") from exc
    extra = [c for c in out.columns if c not in DTYPES and c != ABS_PATH_COLUMN]
    return out[COLUMNS + extra].reset_index(drop=True)


def write_manifest(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write `manifest.parquet` and `manifest.csv` into `out_dir` (each atomically).

    Rows are sorted by `sample_id` so the files are byte-stable for DVC.

    Returns:
        The parquet path.

    Raises:
        DataError: a required column is missing or `sample_id` is not unique.
    """
    out = coerce_manifest(df)
    dup = out["sample_id"][out["sample_id"].duplicated()]
    if len(dup):
        raise DataError(f"sample_id not unique, e.g. {dup.iloc[0]!r}")
    out = out.sort_values("sample_id", kind="stable").reset_index(drop=True)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = manifest_path(folder)
    with atomic_path(target) as tmp:
        out.to_parquet(tmp, index=False)
    with atomic_path(folder / CSV_NAME) as tmp:
        out.to_csv(tmp, index=False)
    return target


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest (parquet, or csv) with fixed dtypes and absolute image paths.

    Args:
        path: `manifest.parquet`, `manifest.csv`, or the folder holding `manifest.parquet`.

    Returns:
        The manifest with one extra column `abs_path` (str): `image_path` resolved
        against the manifest's folder.

    Raises:
        DataError: the file is missing or unreadable, or lacks a required column.
    """
    p = Path(path)
    if p.is_dir():
        p = manifest_path(p)
    if not p.is_file():
        raise DataError("manifest not found", path=p)
    try:
        df = pd.read_csv(p) if p.suffix.lower() == ".csv" else pd.read_parquet(p)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read manifest: {exc}", path=p) from exc
    try:
        df = coerce_manifest(df)
    except DataError as exc:
        raise DataError(str(exc), path=p) from exc
    df[ABS_PATH_COLUMN] = resolve_image_paths(df, p.parent)
    return df


def resolve_image_paths(df: pd.DataFrame, manifest_dir: str | Path) -> pd.Series:
    """Absolute image paths (str) of a manifest's rows, given the manifest's folder."""
    base = Path(manifest_dir).resolve()
    return pd.Series([str(base / str(rel)) for rel in df["image_path"]], index=df.index, dtype="string")


__all__ = [
    "MANIFEST_NAME",
    "CSV_NAME",
    "REQUIRED_COLUMNS",
    "ATTRIBUTE_COLUMNS",
    "PROVENANCE_COLUMNS",
    "COLUMNS",
    "DTYPES",
    "SPLITS",
    "PATHOLOGIES",
    "PATHOLOGY_LABEL",
    "VIEWS",
    "LATERALITIES",
    "ABS_PATH_COLUMN",
    "normalise_id",
    "is_inside",
    "manifest_path",
    "coerce_manifest",
    "write_manifest",
    "read_manifest",
    "resolve_image_paths",
]


def private_manifests(prepared_dir: str | Path) -> list[Path]:
    """The prepared private/test sets (CBIS, BCDR) present under `prepared_dir`."""
    return [m for m in (manifest_path(prepared_dir, s) for s in ("cbis", "bcdr")) if m.is_file()]


def check_public_disjoint(public: pd.DataFrame, public_manifest: Path, others: list[Path], knob: str) -> None:
    """Refuse a public set that shares a patient with a private or test split.

    Args:
        knob: the setting that moves the public set's patient ids (named in the error).

    Raises:
        DataError: naming the manifest that shares patients, and a few of them.
    """
    mine = set(public["patient_id"].astype(str))
    for m in others:
        shared = sorted(mine & set(pd.read_parquet(m, columns=["patient_id"])["patient_id"].astype(str)))
        if shared:
            raise DataError(f"the public set {public_manifest} shares {len(shared)} patient(s) with "
                            f"this private/test set, e.g. {', '.join(shared[:3])}; a public set must hold "
                            f"no private patient ({knob})", path=m)
