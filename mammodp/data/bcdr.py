"""BCDR importer: outline CSVs + 8-bit TIFF/PNG images -> one patch per mass outline.

Every `bcdr_*_outlines.csv` below the root is read (film and digital subsets alike). Quirks
handled (REFERENCE): cells with a leading space, outlines as space-separated integer
strings, density ' N/A' (null), classification with varying case and whitespace, rows of
other lesion types (only `mammography_nodule == 1`, i.e. masses, are kept), and exact
duplicate patches (dropped, counted). Patient ids carry their subset (`bcdr-d01/3`) since
ids repeat across subsets. The whole set is the external test set (split `external`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from mammodp.data.dicom import normalise_minmax
from mammodp.data.imageio import to_uint16
from mammodp.data.manifest import is_inside, normalise_id
from mammodp.data.patches import ImagePatches, PatchGeometry, extract_patch
from mammodp.errors import DataError, MammoDPError

log = logging.getLogger(__name__)

SOURCE = "bcdr"
SPLIT = "external"
CSV_PATTERN = re.compile(r"^bcdr_(?P<subset>[a-z0-9]+)_outlines\.csv$", re.IGNORECASE)
REQUIRED = (
    "patient_id",
    "study_id",
    "lesion_id",
    "image_filename",
    "image_view",
    "lw_x_points",
    "lw_y_points",
    "mammography_nodule",
    "classification",
)
# image_view code -> (view name used in sample ids, view, laterality)
VIEWS = {1: ("RCC", "CC", "RIGHT"), 2: ("LCC", "CC", "LEFT"), 3: ("RMLO", "MLO", "RIGHT"), 4: ("LMLO", "MLO", "LEFT")}
CLASSIFICATION = {"benign": "BENIGN", "malign": "MALIGNANT", "malignant": "MALIGNANT"}
PATHOLOGY_LABEL = {"BENIGN": 0, "MALIGNANT": 1}


@dataclass(frozen=True)
class Outline:
    """One mass outline: its manifest fields and polygon (image pixel coordinates)."""

    row: dict
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def sample_id(self) -> str:
        return self.row["sample_id"]


@dataclass(frozen=True)
class ImageTask:
    """One BCDR image and the mass outlines drawn on it (the unit of parallel work)."""

    root: Path
    image: Path
    csv_file: str
    outlines: tuple[Outline, ...]

    @property
    def sample_ids(self) -> list[str]:
        return [o.sample_id for o in self.outlines]

    @property
    def describe(self) -> str:
        return str(self.image)


def find_outline_csvs(root: str | Path) -> list[Path]:
    """Every `bcdr_<subset>_outlines.csv` below `root`, sorted.

    Raises:
        DataError: none is found.
    """
    root = Path(root)
    hits = sorted(p for p in root.rglob("*.csv") if CSV_PATTERN.match(p.name))
    if not hits:
        raise DataError("no bcdr_*_outlines.csv found below this folder", path=root)
    return hits


def parse_points(text: object) -> tuple[int, ...]:
    """Parse an outline coordinate string such as ' 12 15 19' into integers."""
    s = str(text).strip()
    if not s:
        return ()
    return tuple(int(round(float(t))) for t in s.split())


def _number(value: object) -> float | None:
    try:
        v = float(str(value).strip())
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def read_outline_csv(path: str | Path) -> list[tuple[Path, Outline]]:
    """Read one outlines CSV; keep mass rows; return (image file, outline) pairs in file order.

    Args:
        path: the CSV (`bcdr_<subset>_outlines.csv`; the subset prefixes patient ids).

    Raises:
        DataError: unreadable CSV, a missing column, a bad outline, or a classification
            other than Benign/Malign (naming the CSV and the value).
    """
    p = Path(path)
    m = CSV_PATTERN.match(p.name)
    subset = (m.group("subset") if m else p.parent.name).lower()
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read CSV: {exc}", path=p) from exc
    df = df.rename(columns={c: str(c).strip() for c in df.columns})
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"missing columns {missing}; found {list(df.columns)}", path=p)
    out: list[tuple[Path, Outline]] = []
    for i, r in enumerate(df.to_dict("records")):
        if _number(r["mammography_nodule"]) != 1:
            continue  # calcifications, distortions, ...: not a mass
        cls = " ".join(str(r["classification"]).split()).lower()
        if cls not in CLASSIFICATION:
            raise DataError(
                f"unknown classification {r['classification']!r} (row {i + 2}); expected Benign or Malign",
                path=p,
            )
        pathology = CLASSIFICATION[cls]
        patient, study, lesion = (normalise_id(r[k]) for k in ("patient_id", "study_id", "lesion_id"))
        if not patient:
            raise DataError(f"row {i + 2}: empty patient_id", path=p)
        code = _number(r["image_view"])
        unknown_view = (f"v{str(r['image_view']).strip()}", None, None)  # kept apart, attributes null
        view_name, view, laterality = VIEWS.get(int(code) if code is not None else -1, unknown_view)
        try:
            xs, ys = parse_points(r["lw_x_points"]), parse_points(r["lw_y_points"])
        except ValueError as exc:
            raise DataError(f"row {i + 2}: outline is not a list of integers ({exc})", path=p) from exc
        if len(xs) != len(ys) or len(xs) < 3:
            raise DataError(
                f"row {i + 2}: outline needs >= 3 points and as many x as y, got {len(xs)} x / {len(ys)} y",
                path=p,
            )
        age = _number(r.get("age", ""))
        density = _number(r.get("density", ""))
        row = {
            "sample_id": f"bcdr-{subset}-{patient}-{study}-{lesion}-{view_name}",
            "patient_id": f"bcdr-{subset}/{patient}",
            "label": PATHOLOGY_LABEL[pathology],
            "pathology": pathology,
            "source": SOURCE,
            "split": SPLIT,
            "breast_density": int(density) if density is not None and int(density) in (1, 2, 3, 4) else pd.NA,
            "age": age if age is not None else np.nan,
            "view": view if view is not None else pd.NA,
            "laterality": laterality if laterality is not None else pd.NA,
            "assessment": pd.NA,
            "subtlety": pd.NA,
        }
        filename = str(r["image_filename"]).strip().replace("\\", "/")
        out.append((p.parent / filename, Outline(row, xs, ys)))
    return out


def plan(root: str | Path, *, skip_missing: bool = False) -> tuple[list[ImageTask], list[dict]]:
    """Read every outlines CSV below `root` and group mass outlines by image.

    Args:
        root: folder holding the BCDR subset folders (searched recursively).
        skip_missing: list outlines whose image is missing instead of raising.

    Returns:
        (tasks, skipped) as in `mammodp.data.cbis.plan`.

    Raises:
        DataError: a CSV problem, or (unless `skip_missing`) a missing image, naming it.
    """
    root = Path(root)
    by_image: dict[Path, tuple[str, list[Outline]]] = {}
    seen: dict[str, int] = {}
    skipped: list[dict] = []
    for csv in find_outline_csvs(root):
        for image, outline in read_outline_csv(csv):
            if not is_inside(image, root):  # `../..` or an absolute path: never opened
                raise DataError(f"image_filename of {outline.sample_id} points outside the data root {root}: "
                                f"{image}", path=csv)
            sid = outline.row["sample_id"]
            seen[sid] = seen.get(sid, 0) + 1
            if seen[sid] > 1:  # the same lesion and view outlined twice: keep both, apart
                outline = Outline(dict(outline.row, sample_id=f"{sid}-{seen[sid]}"), outline.xs, outline.ys)
            if not image.is_file():
                err = DataError(f"image not found (row of {csv})", path=image)
                if not skip_missing:
                    raise err
                skipped.append({"file": str(image), "reason": str(err), "sample_ids": [outline.sample_id]})
                continue
            by_image.setdefault(image, (str(csv), []))[1].append(outline)
    tasks = [ImageTask(root, img, csv, tuple(outs)) for img, (csv, outs) in sorted(by_image.items())]
    return tasks, skipped


def read_image(path: str | Path) -> np.ndarray:
    """Read a BCDR TIFF/PNG as float32 [0, 1] (min-max of the whole image).

    Raises:
        DataError: the file is missing or not a readable image.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("image not found", path=p)
    try:
        with Image.open(p) as im:
            if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                im = im.convert("L")
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError on some broken files
        raise DataError(f"cannot read image ({type(exc).__name__}: {exc})", path=p) from exc
    if arr.ndim != 2:
        raise DataError(f"expected a greyscale image, got shape {arr.shape}", path=p)
    try:
        return normalise_minmax(arr)
    except DataError as exc:
        raise DataError(str(exc), path=p) from exc


def outline_mask(xs: tuple[int, ...], ys: tuple[int, ...], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a closed polygon (x = column, y = row), border included, into a bool mask."""
    h, w = shape
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(xs, ys)), fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def process_image(task: ImageTask, geometry: PatchGeometry, *, skip_errors: bool = False) -> ImagePatches:
    """Read one BCDR image and cut one patch per mass outline.

    Args:
        task: the image and its outlines (from `plan`).
        geometry: crop settings.
        skip_errors: an outline that fails (e.g. lies off the image) is listed in
            `skipped` instead of raising; a failure of the image itself always raises.

    Raises:
        DataError: naming the file (image, or CSV for a bad outline).
    """
    out = ImagePatches()
    image = read_image(task.image)
    for o in task.outlines:
        try:
            mask = outline_mask(o.xs, o.ys, image.shape)
            if not mask.any():
                raise DataError(f"outline of {o.sample_id} lies outside its image {task.image}", path=task.csv_file)
            patch = extract_patch(
                image, mask, margin=geometry.margin, min_size=geometry.min_size, patch_size=geometry.patch_size
            )[0]
        except MammoDPError as exc:
            if not skip_errors:
                raise
            out.skipped.append({"file": exc.path or str(task.image), "reason": str(exc), "sample_ids": [o.sample_id]})
            continue
        try:
            rel = task.image.relative_to(task.root).as_posix()
        except ValueError:
            rel = str(task.image)
        out.rows.append(dict(o.row, source_file=rel))
        out.patches.append(patch)
    return out


def drop_exact_duplicates(rows: list[dict], patches: list[np.ndarray]) -> tuple[list[dict], list[np.ndarray], int]:
    """Keep the first of patches whose stored (uint16) pixels are identical.

    Rows are visited in `sample_id` order so the survivor does not depend on worker timing.

    Returns:
        (rows, patches, number dropped).
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i]["sample_id"])
    seen: set[str] = set()
    keep_rows, keep_patches = [], []
    for i in order:
        digest = hashlib.sha256(to_uint16(patches[i]).tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        keep_rows.append(rows[i])
        keep_patches.append(patches[i])
    return keep_rows, keep_patches, len(rows) - len(keep_rows)


__all__ = [
    "SOURCE",
    "SPLIT",
    "Outline",
    "ImageTask",
    "find_outline_csvs",
    "parse_points",
    "read_outline_csv",
    "plan",
    "read_image",
    "outline_mask",
    "process_image",
    "drop_exact_duplicates",
]
