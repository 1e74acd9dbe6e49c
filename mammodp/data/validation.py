"""The data validation suite: Great Expectations 1.x over a manifest and its patches.

Every check is one named GX expectation. Checks that GX cannot express on the raw manifest
(does the image decode? is a patient in two splits? is a split balanced?) are first turned
into derived per-row columns, and the expectation then runs on that column, so every
verdict, count and example in the report comes from GX itself:

| name                                    | derived column            | GX expectation            |
|-----------------------------------------|---------------------------|---------------------------|
| manifest_not_empty                      |                           | table row count >= 1      |
| required_columns_present                |                           | table columns contain set |
| expect_column_values_to_not_be_null(c)  |                           | per required column       |
| expect_column_values_to_be_in_set(c)    |                           | label, pathology, split   |
| label_matches_pathology                 | label_matches_pathology   | in set {True}             |
| expect_column_values_to_be_unique(...)  |                           | sample_id                 |
| ids_well_formed(sample_id, patient_id)  | <id>_well_formed          | in set {True}             |
| images_exist                            | exists                    | in set {True}             |
| images_decode                           | decodes                   | in set {True}             |
| images_have_expected_shape              | shape ("HxW")             | in set {"HxW"}            |
| patients_disjoint_across_splits         | patient_split_count       | in set {1} (ids compared  |
|                                         |                           | as normalised at import)  |
| class_balance_per_split                 | split_malignant_fraction  | between [f, 1 - f]        |
| intensity_mean_in_bounds                | mean                      | between bounds            |
| intensity_std_above_min                 | std                       | >= bound                  |

A derived value is null where its inputs are (no file -> `decodes` null; not decodable ->
`shape`, `mean`, `std` null; null label -> no consistency verdict). GX skips nulls in
column-map expectations, so one defect fails exactly the expectation about its root cause
instead of cascading through every check downstream of it. A required column that is
missing entirely fails `required_columns_present`, and the expectations that need it
fail too (GX reports them as errors): the suite fails closed, never vacuously passes.

Each result keeps a few offending rows as examples (`unexpected_examples`, ids and value) and
the full list (`unexpected_all`); `mammodp validate`'s one-line error names the first one.

GX runs in an ephemeral context with progress bars off; it writes no files, no data
docs, and sends no usage statistics (`GX_ANALYTICS_ENABLED=false`).
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from mammodp.data.imageio import load_patch
from mammodp.data.manifest import PATHOLOGIES, REQUIRED_COLUMNS, SPLITS, normalise_id  # one vocabulary
from mammodp.errors import DataError

LABELS: tuple[int, ...] = (0, 1)  # 1 = malignant, the positive class
MAX_EXAMPLES = 20  # unexpected values / rows kept per expectation in a report

# Columns that identify a row in the examples of a failed expectation (those present).
_ID_COLUMNS: tuple[str, ...] = ("sample_id", "patient_id", "split")


@dataclass(frozen=True)
class ExpectationResult:
    """The verdict of one named expectation.

    Attributes:
        name: stable name used in messages, e.g. `expect_column_values_to_be_unique(sample_id)`
            or `patients_disjoint_across_splits`.
        expectation: the GX expectation type, e.g. `expect_column_values_to_be_in_set`.
        column: the (possibly derived) column it checks; None for table-level checks.
        success: whether it held.
        description: one human sentence saying what is expected.
        observed: GX's summary numbers (element/unexpected/missing counts, observed value).
        unexpected_examples: up to `MAX_EXAMPLES` offending rows (id columns + value) or values.
        error: GX's exception message when the expectation could not be evaluated.
        unexpected_all: every offending row (id columns + value) or value.
    """

    name: str
    expectation: str
    column: str | None
    success: bool
    description: str
    observed: dict[str, Any] = field(default_factory=dict)
    unexpected_examples: list[Any] = field(default_factory=list)
    error: str | None = None
    unexpected_all: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain Python types)."""
        return {
            "name": self.name,
            "expectation": self.expectation,
            "column": self.column,
            "success": self.success,
            "description": self.description,
            "observed": self.observed,
            "unexpected_examples": self.unexpected_examples,
            "unexpected_all": self.unexpected_all,
            "error": self.error,
        }


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of the suite over one manifest.

    Attributes:
        success: True when every expectation held.
        n_rows: rows in the manifest.
        expected_shape: (height, width) every patch must have.
        results: one entry per expectation, in suite order.
    """

    success: bool
    n_rows: int
    expected_shape: tuple[int, int]
    results: list[ExpectationResult]

    @property
    def failed(self) -> list[ExpectationResult]:
        """The expectations that did not hold, in suite order."""
        return [r for r in self.results if not r.success]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: success, counts and every result."""
        return {
            "success": self.success,
            "n_rows": self.n_rows,
            "expected_shape": list(self.expected_shape),
            "statistics": {
                "evaluated": len(self.results),
                "successful": len(self.results) - len(self.failed),
                "failed": len(self.failed),
            },
            "failed": [r.name for r in self.failed],
            "results": [r.to_dict() for r in self.results],
        }


# --------------------------------------------------------------------------- derived columns


def _one_image(path: Path | None) -> tuple[Any, Any, Any, float, float]:
    """(exists, decodes, "HxW", mean, std) of one patch; None/NaN where not determinable."""
    if path is None:
        return None, None, None, math.nan, math.nan
    if not path.is_file():
        return False, None, None, math.nan, math.nan
    try:
        a = load_patch(path)
    except DataError:
        return True, False, None, math.nan, math.nan
    return True, True, f"{a.shape[0]}x{a.shape[1]}", float(a.mean()), float(a.std())


def image_stats(
    image_paths: Sequence[Any],
    manifest_dir: Path,
    *,
    workers: int = 4,
    progress: bool = True,
    desc: str = "decode patches",
) -> pd.DataFrame:
    """Check and summarise every patch named by a manifest.

    Args:
        image_paths: the manifest's `image_path` values (relative to `manifest_dir`; null allowed).
        manifest_dir: the manifest's folder.
        workers: threads decoding in parallel (file reads and Pillow's decoder release the GIL).
        progress: show a tqdm bar on stderr (when stderr is a terminal).
        desc: the bar's label.

    Returns:
        One row per path, same order: `exists` and `decodes` (nullable booleans), `shape`
        ("HxW" string), `mean` and `std` of the [0, 1] intensities (float, NaN if unknown).
    """
    paths = [None if pd.isna(p) else Path(manifest_dir) / str(p) for p in image_paths]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(tqdm(pool.map(_one_image, paths), total=len(paths), desc=desc,
                         # None: tqdm shows the bar on a terminal only, so logs and
                         # captured CLI output stay free of carriage-return noise.
                         unit="img", disable=None if progress else True, leave=False))
    exists, decodes, shape, mean, std = zip(*rows) if rows else ([], [], [], [], [])
    return pd.DataFrame({
        "exists": pd.array(list(exists), dtype="boolean"),
        "decodes": pd.array(list(decodes), dtype="boolean"),
        "shape": pd.array(list(shape), dtype="string"),
        "mean": np.asarray(mean, dtype=np.float64),
        "std": np.asarray(std, dtype=np.float64),
    })


def derive_columns(
    df: pd.DataFrame, manifest_dir: Path, *, workers: int = 4, progress: bool = True
) -> pd.DataFrame:
    """A copy of the manifest with the derived columns the suite's expectations look at.

    A derived column is only added when its inputs exist; the expectation on it then errors
    in GX and fails, rather than passing on an all-null column.

    Args:
        df: the manifest.
        manifest_dir: folder that `image_path` is relative to.
        workers: threads decoding patches.
        progress: show a progress bar while decoding.

    Returns:
        The manifest plus `exists, decodes, shape, mean, std, label_matches_pathology,
        patient_split_count, split_malignant_fraction` (where computable).
    """
    out = df.reset_index(drop=True).copy()
    cols = set(out.columns)
    if "image_path" in cols:
        stats = image_stats(out["image_path"], manifest_dir, workers=workers, progress=progress)
        for c in stats.columns:
            out[c] = stats[c]  # both frames have a fresh RangeIndex: rows align
    if {"label", "pathology"} <= cols:
        known = out["label"].notna() & out["pathology"].notna()
        consistent = (out["pathology"] == "MALIGNANT") == (out["label"] == 1)
        out["label_matches_pathology"] = consistent.astype("boolean").where(known)
    for col in ("sample_id", "patient_id"):
        if col in cols:
            # Empty, or not as normalised at import (' P_00002 '): such ids break joins and the
            # disjointness check downstream. Null stays null (the not-null check's finding).
            text = out[col].astype("string")
            well_formed = text.map(lambda v: bool(normalise_id(v)) and normalise_id(v) == v, na_action="ignore")
            out[f"{col}_well_formed"] = well_formed.astype("boolean")
    if {"patient_id", "split"} <= cols:
        key = out["patient_id"].astype("string").map(normalise_id, na_action="ignore")
        per_patient = out.groupby(key, dropna=True)["split"].nunique()
        count = key.map(per_patient)
        # 0 distinct splits means every split of that patient is null: that is the
        # not-null check's finding, not a leak between splits.
        out["patient_split_count"] = count.where(count > 0).astype("Int64")
    if {"label", "split"} <= cols:
        malignant = (out["label"] == 1).astype(np.float64).where(out["label"].notna())
        fraction = malignant.groupby(out["split"], dropna=True).mean()
        out["split_malignant_fraction"] = out["split"].map(fraction).astype(np.float64)
    return out


# --------------------------------------------------------------------------- the suite


def _checks(
    expected_shape: tuple[int, int],
    min_class_fraction: float,
    intensity_mean: tuple[float, float],
    intensity_std_min: float,
) -> list[tuple[str, Any]]:
    """(name, GX expectation) pairs, in report order. GX is imported here: it is heavy."""
    import great_expectations.expectations as gxe

    shape = f"{expected_shape[0]}x{expected_shape[1]}"
    lo, hi = intensity_mean
    checks: list[tuple[str, Any]] = [
        ("manifest_not_empty", gxe.ExpectTableRowCountToBeBetween(
            min_value=1, description="the manifest has at least one row")),
        ("required_columns_present", gxe.ExpectTableColumnsToMatchSet(
            column_set=list(REQUIRED_COLUMNS), exact_match=False,
            description=f"the manifest has the columns {', '.join(REQUIRED_COLUMNS)}")),
    ]
    for col in REQUIRED_COLUMNS:
        checks.append((f"expect_column_values_to_not_be_null({col})",
                       gxe.ExpectColumnValuesToNotBeNull(
                           column=col, description=f"no row has a null {col}")))
    checks += [
        ("expect_column_values_to_be_in_set(label)", gxe.ExpectColumnValuesToBeInSet(
            column="label", value_set=list(LABELS),
            description="label is 0 (benign) or 1 (malignant)")),
        ("expect_column_values_to_be_in_set(pathology)", gxe.ExpectColumnValuesToBeInSet(
            column="pathology", value_set=list(PATHOLOGIES),
            description=f"pathology is one of {', '.join(PATHOLOGIES)}")),
        ("expect_column_values_to_be_in_set(split)", gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS),
            description=f"split is one of {', '.join(SPLITS)}")),
        ("label_matches_pathology", gxe.ExpectColumnValuesToBeInSet(
            column="label_matches_pathology", value_set=[True],
            description="label is 1 exactly where pathology is MALIGNANT")),
        ("expect_column_values_to_be_unique(sample_id)", gxe.ExpectColumnValuesToBeUnique(
            column="sample_id", description="every sample_id occurs once")),
        ("ids_well_formed(sample_id)", gxe.ExpectColumnValuesToBeInSet(
            column="sample_id_well_formed", value_set=[True],
            description="every sample_id is non-empty, without surrounding or repeated whitespace")),
        ("ids_well_formed(patient_id)", gxe.ExpectColumnValuesToBeInSet(
            column="patient_id_well_formed", value_set=[True],
            description="every patient_id is non-empty, without surrounding or repeated whitespace")),
        ("images_exist", gxe.ExpectColumnValuesToBeInSet(
            column="exists", value_set=[True],
            description="every image_path names a file beside the manifest")),
        ("images_decode", gxe.ExpectColumnValuesToBeInSet(
            column="decodes", value_set=[True],
            description="every existing image file decodes as a patch")),
        ("images_have_expected_shape", gxe.ExpectColumnValuesToBeInSet(
            column="shape", value_set=[shape],
            description=f"every decoded patch is {shape} (height x width) px")),
        ("patients_disjoint_across_splits", gxe.ExpectColumnValuesToBeInSet(
            column="patient_split_count", value_set=[1],
            description="each patient_id (as normalised) occurs in exactly one split")),
        ("class_balance_per_split", gxe.ExpectColumnValuesToBeBetween(
            column="split_malignant_fraction", min_value=min_class_fraction,
            max_value=1.0 - min_class_fraction,
            description=(f"in every split the malignant fraction is within "
                         f"[{min_class_fraction:g}, {1.0 - min_class_fraction:g}]"))),
        ("intensity_mean_in_bounds", gxe.ExpectColumnValuesToBeBetween(
            column="mean", min_value=lo, max_value=hi,
            description=f"every patch's mean intensity is within [{lo:g}, {hi:g}]")),
        ("intensity_std_above_min", gxe.ExpectColumnValuesToBeBetween(
            column="std", min_value=intensity_std_min,
            description=f"every patch's intensity std is at least {intensity_std_min:g}")),
    ]
    return checks


def _plain(value: Any) -> Any:
    """Numpy scalars -> Python, NaN/NA -> None, recursively (GX results hold numpy types)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _error_message(info: dict[str, Any] | None) -> str | None:
    """GX's exception message: `exception_info` is flat, or keyed by metric when a metric failed."""
    if not info:
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    messages = {v.get("exception_message") for v in info.values()
                if isinstance(v, dict) and v.get("raised_exception")}
    messages.discard(None)
    return "; ".join(sorted(messages)) or None


_OBSERVED_KEYS = ("observed_value", "element_count", "unexpected_count", "unexpected_percent",
                  "missing_count", "details")


def _to_result(name: str, description: str, gx_result: Any) -> ExpectationResult:
    cfg = gx_result.expectation_config
    res = gx_result.result or {}
    examples = res.get("partial_unexpected_index_list") or res.get("partial_unexpected_list") or []
    everything = res.get("unexpected_index_list") or res.get("unexpected_list") or []
    error = _error_message(gx_result.exception_info)
    observed = {k: res[k] for k in _OBSERVED_KEYS if k in res}
    if cfg.type == "expect_table_columns_to_match_set":
        # GX lists every column of the batch, derived ones included; what matters is the gap.
        mismatched = (res.get("details") or {}).get("mismatched") or {}
        observed = {"missing": sorted(mismatched.get("missing", []))}
    return ExpectationResult(
        name=name,
        expectation=cfg.type,
        column=cfg.kwargs.get("column"),
        # An expectation GX could not evaluate (missing column) reports success False already;
        # `and error is None` keeps that true even if a GX version reported it otherwise.
        success=bool(gx_result.success) and error is None,
        description=description,
        observed=_plain(observed),
        unexpected_examples=_plain(list(examples)[:MAX_EXAMPLES]),
        error=error,
        unexpected_all=_plain(list(everything)),
    )


def validate_manifest(
    df: pd.DataFrame,
    manifest_dir: str | Path,
    *,
    expected_shape: tuple[int, int],
    min_class_fraction: float,
    intensity_mean: tuple[float, float],
    intensity_std_min: float,
    workers: int = 4,
    progress: bool = True,
) -> ValidationReport:
    """Run the validation suite over one manifest and the patches it names.

    Args:
        df: the manifest (one row per patch; columns per docs/CONTRACTS.md).
        manifest_dir: folder the manifest's `image_path` values are relative to.
        expected_shape: (height, width) in px every patch must have (the prepared patch
            size, or the generator's image size for a synthetic set).
        min_class_fraction: each class must be at least this fraction of every split, in [0, 0.5).
        intensity_mean: (low, high) bounds on each patch's mean intensity in [0, 1].
        intensity_std_min: smallest allowed per-patch intensity std (below: blank/broken).
        workers: threads decoding patches.
        progress: show a tqdm progress bar while decoding (when stderr is a terminal).

    Returns:
        The report: overall success and one `ExpectationResult` per expectation.

    Raises:
        ValueError: a bound is out of range (a programming error; params are checked on load).
    """
    if not 0.0 <= min_class_fraction < 0.5:
        raise ValueError(f"min_class_fraction must be in [0, 0.5), got {min_class_fraction}")
    if not intensity_mean[0] < intensity_mean[1]:
        raise ValueError(f"intensity_mean must be (low, high), low < high; got {intensity_mean}")
    expected_shape = (int(expected_shape[0]), int(expected_shape[1]))
    data = derive_columns(df, Path(manifest_dir), workers=workers, progress=progress)

    # Both must be set before GX is first imported: analytics read the variable at start-up
    # (an explicit user setting wins), and the import itself logs hundreds of INFO lines
    # about its docs registry that would bury the stage's summary under the CLI's INFO logging.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # This one module pins its own logger to INFO on import, overriding the parent's level.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas("manifest").add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": data}
    )
    checks = _checks(expected_shape, min_class_fraction, tuple(intensity_mean), intensity_std_min)
    suite = gx.ExpectationSuite(name="mammodp_manifest")
    for name, expectation in checks:
        expectation.meta = {"name": name}
        suite.add_expectation(expectation)
    gx_results = batch.validate(suite, result_format={
        "result_format": "COMPLETE",  # examples, and the full list of offending rows
        "return_unexpected_index_query": False,
        "partial_unexpected_count": MAX_EXAMPLES,
        "unexpected_index_column_names": [c for c in _ID_COLUMNS if c in data.columns],
    })

    # GX does not keep suite order (errored expectations come first): match by our name.
    by_name = {r.expectation_config.meta["name"]: r for r in gx_results.results}
    results = [_to_result(name, exp.description, by_name[name]) for name, exp in checks]
    return ValidationReport(
        success=all(r.success for r in results),
        n_rows=len(df),
        expected_shape=expected_shape,
        results=results,
    )
