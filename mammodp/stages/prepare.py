"""Stage `prepare`: raw CBIS-DDSM or BCDR data -> lossless patches + manifest.

Reads the source's CSVs, decodes images in parallel (one task per mammogram), cuts one
patch per lesion, assigns patient-disjoint splits and writes, atomically,

    OUT/patches/<sample_id>.png   16-bit greyscale patches
    OUT/manifest.parquet, .csv    one row per patch (image_path relative to OUT)
    OUT/skipped.json              files skipped under `prepare.on_error: skip` (else empty)

A failing file stops the stage with an error naming it, and OUT keeps its previous
contents; with `on_error: skip` the file's lesions are listed in skipped.json instead.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
from tqdm import tqdm

from mammodp import errors
from mammodp.config import Config
from mammodp.data import bcdr, cbis
from mammodp.data.imageio import save_patch
from mammodp.data.manifest import SPLITS, manifest_path, write_manifest
from mammodp.data.patches import ImagePatches, PatchGeometry
from mammodp.data.splits import assign_splits, check_patient_disjoint
from mammodp.errors import ConfigError, DataError, MammoDPError
from mammodp.io import atomic_dir, write_json

log = logging.getLogger(__name__)

IMPORTERS: dict[str, ModuleType] = {"cbis-ddsm": cbis, "bcdr": bcdr}
SKIPPED_NAME = "skipped.json"
PATCH_DIR = "patches"


# prepare.* keys only the CBIS-DDSM import reads (its val split); BCDR is all external.
CBIS_ONLY_KEYS = ("val_fraction", "stratify", "seed")


def _bare_message(exc: MammoDPError) -> str:
    """The error's message without the `path: ` prefix the constructor added."""
    text = str(exc)
    for prefix in (exc.path, exc.field):
        if prefix is not None and text.startswith(f"{prefix}: "):
            return text[len(prefix) + 2 :]
    return text


def _work(source: str, task: Any, geometry: PatchGeometry, skip: bool) -> tuple[ImagePatches | None, dict | None]:
    """Process one image in a worker. A user error comes back as data, not as an exception:
    exceptions lose their `path` when pickled across processes."""
    try:
        return IMPORTERS[source].process_image(task, geometry, skip_errors=skip), None
    except MammoDPError as exc:
        failure = {
            "kind": type(exc).__name__,
            "file": exc.path or task.describe,
            "message": _bare_message(exc),
            "reason": str(exc),
            "sample_ids": task.sample_ids,
        }
        return None, failure


def _raise(failure: dict) -> None:
    cls = getattr(errors, failure["kind"], DataError)
    if not (isinstance(cls, type) and issubclass(cls, MammoDPError)):
        cls = DataError
    raise cls(failure["message"], path=failure["file"])


def _run_tasks(source: str, tasks: list, geometry: PatchGeometry, *, skip: bool, workers: int) -> list[tuple]:
    """Run `_work` over tasks (in-process for workers <= 1); results in task order.

    In fail mode the first failure cancels what has not started and is raised.
    """
    results: list[tuple | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc=f"prepare {source}", unit="image", disable=None)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                results[i] = _work(source, task, geometry, skip)
                bar.update(1)
                if results[i][1] is not None and not skip:
                    _raise(results[i][1])
            return results  # type: ignore[return-value]
        pool = ProcessPoolExecutor(max_workers=workers)
        try:
            pending: dict[Future, int] = {pool.submit(_work, source, t, geometry, skip): i for i, t in enumerate(tasks)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    results[i] = fut.result()
                    bar.update(1)
                    if results[i][1] is not None and not skip:
                        _raise(results[i][1])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results  # type: ignore[return-value]
    finally:
        bar.close()


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _summary(df: pd.DataFrame, source: str, out: Path) -> str:
    parts = []
    for split in SPLITS:
        sub = df[df["split"] == split]
        if len(sub):
            mal = int((sub["label"] == 1).sum())
            parts.append(f"{split} {len(sub)} ({len(sub) - mal} benign / {mal} malignant)")
    return f"prepare {source}: {len(df)} patches -> {out} | " + ", ".join(parts)


def run(cfg: Config, source: str, root: Path, out: Path) -> None:
    """Import one raw source into `out` and log the import as an MLflow run (see `import_source`)."""
    df, skipped = import_source(cfg, source, root, out)
    _log_run(cfg, source, root, out, df, skipped)


def import_source(cfg: Config, source: str, root: Path, out: Path) -> tuple[pd.DataFrame, list]:
    """Import one raw source into `out` (patches, manifest, skip report); no tracking.

    Returns:
        (the manifest, the skipped files).

    Args:
        cfg: the whole config; reads `cfg.prepare`.
        source: "cbis-ddsm" or "bcdr".
        root: folder with the source's CSVs and images (searched recursively).
        out: output folder; replaced whole on success, untouched on failure.

    Raises:
        ConfigError: unknown source.
        DataError / DicomError: a missing, corrupt or inconsistent input, naming it.
    """
    pc = cfg.prepare
    if source not in IMPORTERS:
        raise ConfigError(f"unknown source {source!r}; known: {', '.join(IMPORTERS)}", field="source")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError("raw data folder not found", path=root)
    importer = IMPORTERS[source]
    skip = pc.on_error == "skip"
    geometry = PatchGeometry(margin=pc.margin, min_size=pc.min_size, patch_size=pc.patch_size)

    tasks, skipped = importer.plan(root, skip_missing=skip)
    rows: list[dict] = []
    patches: list = []
    for result, failure in _run_tasks(source, tasks, geometry, skip=skip, workers=pc.workers):
        if failure is not None:
            skipped.append({k: failure[k] for k in ("file", "reason", "sample_ids")})
            continue
        for message in result.warnings:
            log.warning(message)
        skipped.extend(result.skipped)
        rows.extend(result.rows)
        patches.extend(result.patches)

    if source == "bcdr":
        rows, patches, dropped = bcdr.drop_exact_duplicates(rows, patches)
        if dropped:
            log.warning("BCDR: %d exact duplicate patch(es) dropped (first sample_id kept)", dropped)
    if not rows:
        raise DataError(f"no {source} patches could be extracted", path=root)

    df = pd.DataFrame(rows)
    if source == "cbis-ddsm":
        df, overlap = assign_splits(
            df[df["split"] == "train"],
            df[df["split"] == "test"],
            val_fraction=pc.val_fraction,
            stratify=pc.stratify,
            seed=pc.seed,
        )
        if overlap:
            log.warning(
                "CBIS-DDSM: %d patient(s) in both official sets keep only their test rows (e.g. %s)",
                len(overlap),
                overlap[0],
            )
    check_patient_disjoint(df)

    by_id = {r["sample_id"]: p for r, p in zip(rows, patches)}
    names = [f"{PATCH_DIR}/{_SAFE.sub('_', sid)}.png" for sid in df["sample_id"]]
    if len(set(names)) != len(names):
        raise DataError("two sample ids map to the same patch file name", field="sample_id")
    df["image_path"] = names
    skipped.sort(key=lambda s: (str(s["file"]), s["sample_ids"]))

    with atomic_dir(out) as tmp:
        for sid, rel in zip(df["sample_id"], names):
            save_patch(tmp / rel, by_id[sid])
        write_manifest(df, tmp)
        write_json(tmp / SKIPPED_NAME, {"source": source, "on_error": pc.on_error, "skipped": skipped})

    if skipped:
        n_lesions = sum(len(s["sample_ids"]) for s in skipped)
        log.warning(
            "%d lesion(s) from %d file(s) skipped; listed in %s", n_lesions, len(skipped), out / SKIPPED_NAME
        )
    print(_summary(df, source, out))
    return df, skipped


def _log_run(cfg: Config, source: str, root: Path, out: Path, df: pd.DataFrame, skipped: list) -> None:
    """One MLflow run per import: settings, counts per split/class, and the data lineage."""
    import mlflow

    from mammodp import tracking
    from mammodp.config import flatten

    counts = df.groupby(["split", "label"]).size()
    with tracking.start_run(cfg.experiment, "prepare", name=f"prepare/{source}",
                            tags={"source": source, "manifest_hash": tracking.manifest_hash(manifest_path(out))},
                            params={**{k: v for k, v in flatten(cfg.prepare, "prepare").items()
                                       if source == "cbis-ddsm" or k.split(".")[1] not in CBIS_ONLY_KEYS},
                                    "source": source, "root": str(root)}):
        tracking.log_metrics({f"n_{split}_{'malignant' if label == 1 else 'benign'}": int(n)
                              for (split, label), n in counts.items()})
        tracking.log_metrics({"n_patches": len(df), "n_patients": int(df["patient_id"].nunique()),
                              "n_skipped_files": len(skipped)})
        mlflow.log_artifact(str(out / "manifest.csv"), "manifest")
        mlflow.log_artifact(str(out / SKIPPED_NAME), "manifest")
