"""`mammodp validate`: the Great Expectations suite over every manifest, as a pipeline gate.

For each manifest: run `mammodp.data.validation.validate_manifest`, write
`<report_dir>/<folder name>.json` (e.g. `cbis.json`), print one summary line. All reports
are written and logged to one MLflow run before the stage fails, so a failing pipeline
leaves the evidence of every manifest behind. Any failed expectation raises
`ValidationFailed`, naming them all on one line (the CLI exits 1 and DVC stops).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd

from mammodp.config import Config
from mammodp.data.manifest import MANIFEST_NAME
from mammodp.data.validation import ValidationReport, validate_manifest
from mammodp.errors import DataError, ValidationFailed
from mammodp.io import write_json
from mammodp.tracking import log_metrics, log_params, manifest_hash, start_run


def default_manifests(cfg: Config) -> list[Path]:
    """Every `manifest.parquet` directly under a subfolder of `data.prepared_dir`, sorted."""
    root = Path(cfg.data.prepared_dir)
    found = sorted(root.glob(f"*/{MANIFEST_NAME}"))
    if not found:
        raise DataError("no manifest.parquet in any subfolder; run `mammodp prepare` first",
                        path=root)
    return found


def expected_shape(cfg: Config, manifest: Path) -> tuple[int, int]:
    """The patch shape a manifest's images must have: `prepare.patch_size` square.

    Prepared patches are cut at that size, and `mammodp synthesize` resizes generator output
    to it, so every set (real or synthetic) is checked against the same shape.
    """
    return (cfg.prepare.patch_size, cfg.prepare.patch_size)


def _read(manifest: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(manifest)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read manifest as parquet: {exc}", path=manifest) from exc


def first_offender(result) -> str:
    """` (first: patient_id 'P_1', sample_id 's1')` for a failed expectation, '' if GX named none.

    The report holds every offending row (`unexpected_all`); the one-line error names the first.
    """
    if not result.unexpected_examples:
        return ""
    first = result.unexpected_examples[0]
    if isinstance(first, dict):
        text = ", ".join(f"{k} {first[k]!r}" for k in ("patient_id", "sample_id") if k in first)
    else:
        text = f"value {first!r}"
    return f" (first: {text[:160]})"


def _summary(name: str, report: ValidationReport, out: Path) -> str:
    n = len(report.results)
    if report.success:
        return f"{name}: {n}/{n} expectations passed ({report.n_rows} rows) -> {out}"
    failed = ", ".join(r.name + first_offender(r) for r in report.failed)
    return (f"{name}: {len(report.failed)}/{n} expectations FAILED ({report.n_rows} rows): "
            f"{failed} -> {out}")


def run(cfg: Config, manifests: list[Path] | None, report_dir: Path) -> None:
    """Validate manifests, write one JSON report each, log them, fail on any failed expectation.

    Args:
        cfg: the loaded params.
        manifests: manifests to check; None = every prepared manifest (`default_manifests`).
        report_dir: folder for `<name>.json` reports (name = the manifest's folder name).

    Raises:
        DataError: a manifest is missing or unreadable, two manifests share a folder name,
            or there is no prepared manifest at all.
        ValidationFailed: at least one expectation failed (after all reports are written).
    """
    paths = [Path(m) for m in manifests] if manifests else default_manifests(cfg)
    for p in paths:  # fail on a typo before spending minutes decoding the other sets
        if not p.is_file():
            raise DataError("manifest not found", path=p)
    names = [p.resolve().parent.name for p in paths]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise DataError(f"two manifests would both write report {name}.json; "
                            "keep one manifest per folder", path=paths[i])

    report_dir = Path(report_dir)
    failures: list[str] = []
    with start_run(cfg.experiment, "validate", name="validate"):
        import mlflow

        log_params({f"validate.{k}": v for k, v in asdict(cfg.validate).items()})
        totals = {"expectations_evaluated": 0, "expectations_failed": 0}
        for path, name in zip(paths, names):
            shape = expected_shape(cfg, path)
            report = validate_manifest(
                _read(path),
                path.parent,
                expected_shape=shape,
                min_class_fraction=cfg.validate.min_class_fraction,
                intensity_mean=cfg.validate.intensity_mean,
                intensity_std_min=cfg.validate.intensity_std_min,
            )
            out = report_dir / f"{name}.json"
            write_json(out, {"name": name, "manifest": str(path),
                             "manifest_hash": manifest_hash(path), **report.to_dict()})
            print(_summary(name, report, out), flush=True)

            log_params({f"{name}.manifest": str(path), f"{name}.manifest_hash": manifest_hash(path),
                        f"{name}.expected_shape": f"{shape[0]}x{shape[1]}"})
            log_metrics({f"{name}.rows": report.n_rows,
                         f"{name}.expectations_evaluated": len(report.results),
                         f"{name}.expectations_failed": len(report.failed)})
            mlflow.log_artifact(str(out), artifact_path="validation")
            totals["expectations_evaluated"] += len(report.results)
            totals["expectations_failed"] += len(report.failed)
            if not report.success:
                failures.append(f"{name}: " + ", ".join(r.name + first_offender(r) for r in report.failed))
        log_metrics(totals)
        mlflow.set_tag("validation_success", str(not failures).lower())
        if failures:
            # Raised inside the run so MLflow marks it FAILED, like the pipeline.
            raise ValidationFailed("; ".join(failures) + f" (reports in {report_dir})")
