"""CBIS-DDSM importer: case-description CSVs + DICOM tree -> one patch per mass.

Quirks handled (REFERENCE):
- path cells end with a newline; calc CSVs spell `breast density` with a space;
- the CSV names `<folder>/<StudyUID>/<SeriesUID>/000000.dcm`, while a TCIA download stores
  `CBIS-DDSM/<folder>/<date-descr>/<series-descr>/1-1.dcm`: a file is found either at the
  CSV's literal path or among the `.dcm` files below a folder of the CSV's top folder name,
  narrowed by the Study/Series UIDs in the CSV path (read from headers only);
- in an ROI folder the mask and the cropped image can be either file: the mask is told by
  content (binary values, size closest to the full image), never by the CSV column;
- masks whose size differs from their image are resized (nearest) with a warning;
- several abnormalities per image: one patch per abnormality.

Work is split in two: `plan` (main process: reads CSVs, indexes the tree, fails fast on
missing files) and `process_image` (any process: decodes one image and its masks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mammodp.data.dicom import DicomHeader, read_dicom, read_header
from mammodp.data.manifest import PATHOLOGY_LABEL, is_inside, normalise_id
from mammodp.data.patches import ImagePatches, PatchGeometry, extract_patch
from mammodp.errors import DataError, MammoDPError

log = logging.getLogger(__name__)

SOURCE = "cbis-ddsm"
CSV_NAMES = {
    "mass": ("mass_case_description_train_set.csv", "mass_case_description_test_set.csv"),
    "calc": ("calc_case_description_train_set.csv", "calc_case_description_test_set.csv"),
}
# Columns after `_normalise_columns` (both density spellings end up as `breast_density`).
REQUIRED = (
    "patient_id",
    "left or right breast",
    "image view",
    "abnormality id",
    "pathology",
    "image file path",
    "ROI mask file path",
)


@dataclass(frozen=True)
class FileRef:
    """Where a CSV row's DICOM(s) may be: literal paths that exist, and indexed candidates."""

    cells: tuple[str, ...]  # the CSV's path cells (cleaned), for messages
    csv_file: str
    literal: tuple[Path, ...]  # files existing at the CSV's own paths
    candidates: tuple[Path, ...]  # .dcm files below a folder named like the cells' top folder
    uids: tuple[tuple[str, str], ...]  # (StudyInstanceUID, SeriesInstanceUID) from the cells


@dataclass(frozen=True)
class Lesion:
    """One abnormality: its manifest fields and where its ROI files are."""

    row: dict
    roi: FileRef

    @property
    def sample_id(self) -> str:
        return self.row["sample_id"]


@dataclass(frozen=True)
class ImageTask:
    """One full mammogram and the lesions annotated on it (the unit of parallel work)."""

    root: Path
    image: FileRef
    lesions: tuple[Lesion, ...]

    @property
    def sample_ids(self) -> list[str]:
        return [les.sample_id for les in self.lesions]

    @property
    def describe(self) -> str:
        return self.image.cells[0]


# --------------------------------------------------------------------------- CSVs


def _normalise_columns(df: pd.DataFrame) -> pd.DataFrame:
    cols = {c: " ".join(str(c).split()) for c in df.columns}
    df = df.rename(columns=cols)
    if "breast density" in df.columns and "breast_density" not in df.columns:
        df = df.rename(columns={"breast density": "breast_density"})
    return df


def find_case_csvs(root: str | Path, abnormality: str = "mass") -> dict[str, Path]:
    """Locate the train and test case-description CSVs below `root` (recursively).

    Returns:
        {"train": path, "test": path}.

    Raises:
        DataError: a CSV is missing or found more than once.
    """
    root = Path(root)
    if abnormality not in CSV_NAMES:
        raise DataError(f"unknown abnormality type {abnormality!r}; known: {sorted(CSV_NAMES)}")
    out = {}
    for split, name in zip(("train", "test"), CSV_NAMES[abnormality]):
        hits = sorted(root.rglob(name))
        if not hits:
            raise DataError(f"{name} not found below this folder", path=root)
        if len(hits) > 1:
            raise DataError(f"{name} found {len(hits)} times: {', '.join(map(str, hits))}", path=root)
        out[split] = hits[0]
    return out


def _clean_cell(value: object) -> str:
    # Cells end with "\n" (and sometimes spaces); Windows-made copies use backslashes.
    return str(value).strip().replace("\\", "/") if isinstance(value, str) else ""


def _int_or_na(value: object, valid: range | None = None):
    try:
        v = int(float(str(value).strip()))
    except ValueError:
        return pd.NA
    if valid is not None and v not in valid:
        return pd.NA
    return v


def read_case_csv(path: str | Path, official_split: str) -> pd.DataFrame:
    """Read one case-description CSV into manifest fields (one row per abnormality).

    Args:
        path: the CSV.
        official_split: "train" or "test" (the CSV's official split).

    Returns:
        Columns: sample_id, patient_id, label, pathology, source, split (official),
        breast_density, age, view, laterality, assessment, subtlety, image_cell, roi_cells,
        csv_file.

    Raises:
        DataError: the CSV is unreadable, lacks a column, or has an unknown pathology.
    """
    p = Path(path)
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read CSV: {exc}", path=p) from exc
    df = _normalise_columns(raw)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"missing columns {missing}; found {list(df.columns)}", path=p)
    rows = []
    for i, (_, r) in enumerate(df.iterrows()):
        patient = normalise_id(r["patient_id"])
        if not patient:
            raise DataError(f"row {i + 2}: empty patient_id", path=p)
        pathology = str(r["pathology"]).strip().upper()
        if pathology not in PATHOLOGY_LABEL:
            raise DataError(
                f"unknown pathology {r['pathology']!r}; known: {sorted(PATHOLOGY_LABEL)}", path=p
            )
        image_cell = _clean_cell(r["image file path"])
        roi_cells = tuple(
            c
            for c in (_clean_cell(r["ROI mask file path"]), _clean_cell(r.get("cropped image file path", "")))
            if c
        )
        image_folder = image_cell.split("/")[0]
        abnormality = str(r["abnormality id"]).strip()
        # The ROI folder (`<image folder>_<abnormality id>`) names the lesion uniquely.
        roi_folder = roi_cells[0].split("/")[0] if roi_cells else f"{image_folder}_{abnormality}"
        rows.append(
            {
                "sample_id": f"cbis-{roi_folder}",
                "patient_id": patient,
                "label": PATHOLOGY_LABEL[pathology],
                "pathology": pathology,
                "source": SOURCE,
                "split": official_split,
                "breast_density": _int_or_na(r.get("breast_density", ""), range(1, 5)),
                "age": np.nan,  # CBIS-DDSM does not record age
                "view": str(r["image view"]).strip().upper(),
                "laterality": str(r["left or right breast"]).strip().upper(),
                "assessment": _int_or_na(r.get("assessment", "")),
                "subtlety": _int_or_na(r.get("subtlety", "")),
                "image_cell": image_cell,
                "roi_cells": roi_cells,
                "csv_file": str(p),
            }
        )
    return pd.DataFrame(rows)


def load_cases(root: str | Path, abnormality: str = "mass") -> pd.DataFrame:
    """Read the train and test CSVs below `root`; duplicate abnormalities keep their first row."""
    csvs = find_case_csvs(root, abnormality)
    parts = {s: read_case_csv(csvs[s], s) for s in ("train", "test")}
    if parts["train"].empty:
        raise DataError("has a header but no rows: no training case to import", path=csvs["train"])
    if parts["test"].empty:
        log.warning("%s has a header but no rows: the test split will be empty", csvs["test"])
    df = pd.concat([p for p in parts.values() if not p.empty], ignore_index=True)
    dup = df["sample_id"].duplicated()
    if dup.any():
        log.warning("CBIS-DDSM: %d duplicate abnormality rows dropped (e.g. %s)", int(dup.sum()),
                    df.loc[dup, "sample_id"].iloc[0])
        df = df[~dup].reset_index(drop=True)
    return df


# --------------------------------------------------------------------------- file index


def index_dicoms(root: str | Path) -> dict[str, list[Path]]:
    """Map every folder name below `root` to the `.dcm` files beneath it (one walk).

    A file is listed under each of its ancestor folders' names, so a CSV's top folder
    (`Mass-Training_P_00001_LEFT_CC`) finds its files at any depth of the download.
    """
    root = Path(root)
    index: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dcms = sorted(f for f in filenames if f.lower().endswith(".dcm"))
        if not dcms:
            continue
        here = Path(dirpath)
        names = here.relative_to(root).parts
        for name in set(names):
            index.setdefault(name, []).extend(here / f for f in dcms)
    return index


def _file_ref(root: Path, csv_file: Path, cells: tuple[str, ...], index: dict[str, list[Path]]) -> FileRef:
    literal: list[Path] = []
    uids: list[tuple[str, str]] = []
    folders: list[str] = []
    for cell in cells:
        for base in (root, csv_file.parent, root / "CBIS-DDSM"):
            cand = base / cell
            if not is_inside(cand, root):  # `../..` or an absolute path: never opened
                raise DataError(f"path cell {cell!r} points outside the data root {root} (row of {csv_file})",
                                path=csv_file)
            if cand.is_file():
                if cand not in literal:
                    literal.append(cand)
                break
        parts = cell.split("/")
        if parts and parts[0] not in folders:
            folders.append(parts[0])
        if len(parts) >= 4:
            uids.append((parts[1], parts[2]))
    candidates: list[Path] = []
    for folder in folders:
        for f in index.get(folder, []):
            if f not in candidates:
                candidates.append(f)
    return FileRef(cells, str(csv_file), tuple(literal), tuple(candidates), tuple(uids))


def _missing(ref: FileRef) -> DataError:
    return DataError(f"no DICOM found for this CSV path (row of {ref.csv_file})", path=ref.cells[0])


def plan(root: str | Path, *, skip_missing: bool = False, abnormality: str = "mass"):
    """Read the CSVs, index the DICOM tree and group lesions by full image.

    Args:
        root: folder holding the CSVs and the DICOM tree (searched recursively).
        skip_missing: list rows whose files are not found instead of raising.
        abnormality: "mass" (the study's task) or "calc".

    Returns:
        (tasks, skipped): `ImageTask`s sorted by image, and skip entries
        `{"file", "reason", "sample_ids"}` for rows whose files are missing.

    Raises:
        DataError: a CSV problem, or (unless `skip_missing`) a row whose file is not found,
            naming the row's path and the CSV.
    """
    root = Path(root)
    cases = load_cases(root, abnormality)
    index = index_dicoms(root)
    skipped: list[dict] = []
    by_image: dict[str, tuple[FileRef, list[Lesion]]] = {}
    for rec in cases.to_dict("records"):
        csv_file = Path(rec.pop("csv_file"))
        image_cell = rec.pop("image_cell")
        roi_cells = rec.pop("roi_cells")
        if image_cell not in by_image:
            ref = _file_ref(root, csv_file, (image_cell,), index)
            by_image[image_cell] = (ref, [])
        image_ref = by_image[image_cell][0]
        roi_ref = _file_ref(root, csv_file, roi_cells, index) if roi_cells else None
        problem = None
        if not image_ref.literal and not image_ref.candidates:
            problem = _missing(image_ref)
        elif roi_ref is None:
            problem = DataError(f"row of {rec['sample_id']} has no ROI mask path (in {csv_file})", path=csv_file)
        elif not roi_ref.literal and not roi_ref.candidates:
            problem = _missing(roi_ref)
        if problem is not None:
            if not skip_missing:
                raise problem
            skipped.append({"file": problem.path, "reason": str(problem), "sample_ids": [rec["sample_id"]]})
            continue
        by_image[image_cell][1].append(Lesion(rec, roi_ref))
    tasks = [
        ImageTask(root, ref, tuple(lesions)) for _, (ref, lesions) in sorted(by_image.items()) if lesions
    ]
    return tasks, skipped


# --------------------------------------------------------------------------- decoding


def _headers(paths: tuple[Path, ...] | list[Path]) -> list[DicomHeader]:
    return [read_header(p) for p in paths]


def _narrow_by_uid(headers: list[DicomHeader], uids: tuple[tuple[str, str], ...]) -> list[DicomHeader]:
    """Headers whose (study, series) the CSV names; all of them if the UIDs match none."""
    wanted = set(uids)
    hit = [h for h in headers if (h.study_uid, h.series_uid) in wanted]
    if hit:
        return hit
    studies = {s for s, _ in uids}
    hit = [h for h in headers if h.study_uid in studies]
    return hit or headers


def resolve_image(ref: FileRef) -> Path:
    """The full mammogram file of a CSV row (the literal path, else the best indexed match)."""
    if ref.literal:
        return ref.literal[0]
    if not ref.candidates:
        raise _missing(ref)
    headers = _narrow_by_uid(_headers(ref.candidates), ref.uids)
    # A full-image folder holds one file; if a download left more, the largest is the mammogram.
    best = max(headers, key=lambda h: (h.rows * h.columns, -headers.index(h)))
    return best.path


def load_mask(ref: FileRef, shape: tuple[int, int]) -> tuple[np.ndarray, Path, list[str]]:
    """Find an abnormality's binary mask among its ROI files and fit it to the image shape.

    The mask is the file with binary values; among several, the one closest in size to the
    full image. The CSV's column names are not trusted for which file is which.

    Returns:
        (boolean mask of `shape`, mask file, warnings).

    Raises:
        DataError: no ROI file holds a binary mask.
        DicomError: an ROI file is corrupt.
    """
    headers = _headers(ref.literal)
    if ref.candidates:
        for h in _narrow_by_uid(_headers(ref.candidates), ref.uids):
            if h.path not in ref.literal:
                headers.append(h)
    if not headers:
        raise _missing(ref)
    H, W = shape
    # Decode the likeliest mask first (size closest to the image); the cropped image is small.
    order = sorted(headers, key=lambda h: (abs(h.rows - H) + abs(h.columns - W), str(h.path)))
    for h in order:
        arr = read_dicom(h.path)
        if not np.isin(arr, (0.0, 1.0)).all():
            continue  # greyscale: the cropped lesion image, not the mask
        mask = arr > 0.5
        warnings = []
        if mask.shape != (H, W):
            warnings.append(
                f"{h.path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is {H}x{W}; "
                "resized (nearest neighbour)"
            )
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((W, H), Image.Resampling.NEAREST)
            mask = np.asarray(resized) > 127
        return mask, h.path, warnings
    names = ", ".join(str(h.path) for h in headers)
    raise DataError(f"no binary ROI mask among {names} (in {ref.csv_file})", path=ref.cells[0])


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def process_image(task: ImageTask, geometry: PatchGeometry, *, skip_errors: bool = False) -> ImagePatches:
    """Decode one mammogram and cut one patch per annotated abnormality.

    Args:
        task: the image and its lesions (from `plan`).
        geometry: crop settings.
        skip_errors: a lesion whose ROI files fail is listed in `skipped` instead of raising.
            A failure of the full image itself always raises (the caller decides).

    Returns:
        Rows (manifest fields without `image_path`), patches, warnings and skipped lesions.

    Raises:
        DataError / DicomError: naming the file that failed.
    """
    out = ImagePatches()
    image_path = resolve_image(task.image)
    image = read_dicom(image_path)
    for lesion in task.lesions:
        try:
            mask, mask_path, warnings = load_mask(lesion.roi, image.shape)
            if not mask.any():
                raise DataError("ROI mask is empty", path=mask_path)
            patch = extract_patch(
                image,
                mask,
                margin=geometry.margin,
                min_size=geometry.min_size,
                patch_size=geometry.patch_size,
            )[0]
        except MammoDPError as exc:
            if not skip_errors:
                raise
            out.skipped.append(
                {"file": exc.path or lesion.roi.cells[0], "reason": str(exc), "sample_ids": [lesion.sample_id]}
            )
            continue
        out.warnings.extend(warnings)
        out.rows.append(dict(lesion.row, source_file=_relative(image_path, task.root)))
        out.patches.append(patch)
    return out


__all__ = [
    "SOURCE",
    "FileRef",
    "Lesion",
    "ImageTask",
    "find_case_csvs",
    "read_case_csv",
    "load_cases",
    "index_dicoms",
    "plan",
    "resolve_image",
    "load_mask",
    "process_image",
]
