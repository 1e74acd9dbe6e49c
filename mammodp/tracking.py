"""MLflow conventions: one run helper, tags, lineage, plots.

The tracking store is MLflow's own default (a bare `mlflow ui` in the repo root shows every
run) unless `MLFLOW_TRACKING_URI` says otherwise; tests point that at a temp store.
MLflow is imported here, at the edge, so the training core runs where MLflow is absent.

Run names: `<stage>/<regime>/eps=<e>/seed=<s>` (parts omitted when they do not apply).
Tags on every run: `stage`, `git_commit`, `data_version` (+ `regime`, `epsilon`, `delta`,
`seed` where they apply).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import yaml


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's model-training view


@functools.lru_cache(maxsize=None)
def git_commit(cwd: str = ".") -> str:
    """The current commit (with `-dirty` if the tree has changes), or `unknown` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """The DVC content hash of the raw data (from data.dvc), or `untracked`."""
    p = Path(dvc_file)
    if not p.is_file():
        return "untracked"
    try:
        outs = (yaml.safe_load(p.read_text()) or {}).get("outs", [])
        return str(outs[0].get("md5", "untracked")) if outs else "untracked"
    except (yaml.YAMLError, AttributeError, IndexError):
        return "untracked"


def manifest_hash(path: str | Path) -> str:
    """Short SHA-256 of a manifest file: the lineage of exactly the rows a run used."""
    h = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return h[:16]


def run_name(stage: str, regime: str | None = None, epsilon: float | None = None,
             seed: int | None = None) -> str:
    """`<stage>/<regime>/eps=<e>/seed=<s>`, leaving out the parts that are None."""
    from mammodp.config import format_epsilon

    parts = [stage]
    if regime is not None:
        parts.append(regime)
    if epsilon is not None:
        parts.append(f"eps={format_epsilon(epsilon)}")
    if seed is not None:
        parts.append(f"seed={seed}")
    return "/".join(parts)


def _clean(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


@contextlib.contextmanager
def start_run(
    experiment: str,
    stage: str,
    *,
    name: str | None = None,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    description: str | None = None,
) -> Iterator[Any]:
    """Open (or resume, with `run_id`) an MLflow run with the house tags; yields the run.

    Args:
        experiment: MLflow experiment name (one per study, from params `experiment`).
        stage: pipeline stage name; becomes tag `stage`.
        name: run name; defaults to the stage.
        tags: extra tags (values stringified; inf -> "inf").
        params: flat params to log (values stringified, batched).
        nested: nest under the active run.
        parent_run_id: nest under this run even if it is not active (e.g. a grid parent).
        run_id: resume an existing run instead of creating one.
        description: run description (`mlflow.note.content`).

    A run left by Ctrl-C, SIGTERM or SIGHUP ends KILLED (an error ends it FAILED).
    """
    import mlflow

    from mammodp.io import raise_on_termination

    raise_on_termination()  # SIGTERM unwinds this block like Ctrl-C: the run is marked KILLED
    _ensure_experiment(experiment)
    exp = mlflow.set_experiment(experiment)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        # MLflow 3 opens an experiment in the GenAI or the model-training view by this tag.
        mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    all_tags = {"stage": stage, "git_commit": git_commit(), "data_version": data_version(),
                # MLflow would record the script's absolute path (a local path in a shared store).
                "mlflow.source.name": f"mammodp {stage}"}
    all_tags.update(tags or {})
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if description:
        all_tags["mlflow.note.content"] = description
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else (name or stage),
        nested=nested,
        tags=None if run_id else {k: _clean(v) for k, v in all_tags.items()},
    ) as run:
        if run_id is not None and tags:
            mlflow.set_tags({k: _clean(v) for k, v in tags.items()})
        if params:
            log_params(params)
        try:
            yield run
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP via raise_on_termination
            mlflow.end_run("KILLED")  # MLflow's own exit would say FAILED (or leave it RUNNING)
            raise


def is_local_store(uri: str) -> bool:
    """A tracking URI of a store on this machine's disk (SQLite or a folder), not a server."""
    return not uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql"))


def _ensure_experiment(experiment: str) -> None:
    """Create a missing experiment; in a local store, with a project-relative artifact root.

    MLflow would record `file:///<absolute clone path>/mlruns/<id>` (see `mammodp.mlflow_plugin`).
    A server (MLFLOW_TRACKING_URI=http://...) chooses its own (`mlflow-artifacts:/`).
    """
    import re

    import mlflow

    from mammodp import mlflow_plugin

    mlflow_plugin.register()
    if not is_local_store(mlflow.get_tracking_uri()) or mlflow.get_experiment_by_name(experiment) is not None:
        return
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
    try:
        mlflow.create_experiment(experiment, artifact_location=f"{mlflow_plugin.SCHEME}:mlruns/{slug}")
    except mlflow.exceptions.MlflowException:
        if mlflow.get_experiment_by_name(experiment) is None:  # not a concurrent creation: a real error
            raise


def log_params(params: dict[str, Any]) -> None:
    """Log params in batches of 100 (MLflow's limit), stringifying values."""
    import mlflow

    items = [(k, _clean(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics; non-finite values (inf epsilon) are skipped, not crashed on."""
    import mlflow

    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_metric_steps(rows: list[tuple[int, dict[str, float]]]) -> None:
    """Log many steps' metrics of the active run in a few batched calls (`rows`: (step, metrics)).

    One `log_metrics` per training step costs a store round trip each (~10 ms on SQLite, more
    on a server): a GAN epoch's steps go in one batch instead. Non-finite values are skipped,
    as in `log_metrics`.
    """
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(step)) for step, values in rows for k, v in values.items()
               if isinstance(v, (int, float)) and math.isfinite(float(v))]
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)


def log_figure(fig: Any, artifact_file: str, saved: str | Path | None = None) -> None:
    """Log a matplotlib figure as an artifact (PNG) of the active run.

    `saved`: the PNG this figure was already written to (the DVC plot): it is logged as it
    is, so MLflow shows the very file DVC tracks and the figure is not rendered twice.
    Its file name must be `artifact_file`'s.
    """
    import mlflow

    if saved is not None and Path(saved).is_file():
        folder, _, name = artifact_file.rpartition("/")
        if Path(saved).name == name:
            mlflow.log_artifact(str(saved), folder or None)
            return
    mlflow.log_figure(fig, artifact_file)


def find_runs(experiment: str, filter_string: str = "", order_by: list[str] | None = None):
    """Runs of `experiment` as a pandas DataFrame (empty if the experiment does not exist)."""
    import mlflow
    import pandas as pd

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    return mlflow.search_runs(
        experiment_ids=[exp.experiment_id], filter_string=filter_string, order_by=order_by or []
    )


def log_dataset(frame, manifest: str | Path, name: str, context: str) -> None:
    """Log the manifest rows a run used as an MLflow dataset input (the UI's Dataset column).

    Args:
        frame: the manifest rows used (machine-specific columns such as `abs_path` are dropped,
            so the digest is the rows' content, the same on every machine).
        manifest: the manifest file, recorded as the dataset's source (as given: relative paths
            stay relative, so no local absolute path leaks into a shared store).
        name: dataset name, e.g. `cbis-train`.
        context: MLflow input context, e.g. `training`, `validation`, `test`.
    """
    import warnings

    import mlflow

    rows = frame.drop(columns=[c for c in ("abs_path",) if c in frame.columns]).reset_index(drop=True)
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a local file
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(rows, source=str(manifest), name=name,
                                          targets="label" if "label" in rows.columns else None)
        # The dataset's schema is inferred when it is logged; MLflow then hints that integer
        # columns (label, density) cannot hold missing values: about a schema nobody enforces.
        _ = dataset.schema
    # Concurrent runs on one shared SQL store (queue jobs, torchrun ranks, Optuna workers) can all
    # miss the dataset row and insert it at once: MLflow looks it up and inserts in one
    # transaction, so the losers get a unique-key violation on `dataset_pk` and nothing of theirs
    # is written. A retry then finds the winner's row and links this run to it.
    for attempt in range(5):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as exc:
            if attempt == 4 or not _is_dataset_insert_race(exc):
                raise
            time.sleep(0.2 * (attempt + 1))


def _is_dataset_insert_race(exc: Exception) -> bool:
    """Whether `exc` is the store's unique-key violation on the datasets table (PostgreSQL,
    MySQL or SQLite wording), the one error a retry of `log_input` is known to resolve."""
    text = str(exc)
    return ("dataset_pk" in text or "datasets." in text or "INSERT INTO datasets" in text) and any(
        k in text for k in ("UniqueViolation", "duplicate key", "Duplicate entry", "UNIQUE constraint"))
