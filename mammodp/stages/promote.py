"""Stage `promote`: register the best validation run per budget and point registry aliases at it.

Selection reads only validation metrics (`best_val_auprc`, the value the training loop
selected its checkpoint on, else `final_val_auprc`); the internal and external test metrics
that `evaluate` adds to the runs are copied into version tags for the reader, never compared.

For every target budget E found among the finished train runs of `cfg.experiment`:
- the run with the highest validation AUPRC is registered as a version of
  `promote.model_name` (or its existing version is reused: one version per run);
- the version gets the privacy record as tags (epsilon, delta, accountant, privacy unit,
  noise, sample rate, steps, regime, generator privacy) plus its metrics and source run;
- alias `eps-<E>` points at it. MLflow aliases allow only letters, digits, `_` and `-`, so
  the budget's text (`format_epsilon`) has every other character replaced by `_`:
  `eps-1`, `eps-0_5`, `eps-inf`.
Alias `champion` points at the best of those versions among budgets <= `promote.max_epsilon`
(ties: the smaller budget). If no budget qualifies, `champion` is removed rather than left on
a model outside the allowed budget.

A candidate run without its privacy record is refused (PrivacyError naming the run and what
is missing): a model whose epsilon cannot be stated must not be served. A run whose spent
epsilon exceeded its target (`within_budget=false`) is skipped and listed.

Idempotent: a second promotion registers nothing, rewrites no tag and moves no alias, and
logs no MLflow run (a `promote` run is logged only when the registry changed, as its audit
trail). Registry aliases, never the deprecated stages.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mammodp.config import Config, format_epsilon, parse_epsilon
from mammodp.errors import ConfigError, DataError, PrivacyError
from mammodp.io import write_json

log = logging.getLogger(__name__)

REQUIRED_TAGS = ("epsilon", "delta", "privacy_unit", "within_budget")
REQUIRED_PARAMS = ("accountant",)
VALIDATION_METRICS = ("best_val_auprc", "final_val_auprc")  # in order of preference
# Copied into version tags for the reader; never used to choose.
REPORTED_METRICS = ("final_val_auroc", "internal_auprc", "internal_auroc", "external_auprc", "external_auroc")
PRIVACY_PARAMS = ("accountant", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "privacy_unit")
PROVENANCE_TAGS = ("regime", "seed", "synthetic_privacy", "generator_epsilon", "generator_run_id",
                   "private_data_without_dp", "model_selection")
SELECTION = ("highest validation AUPRC among finished train runs at this target epsilon; "
             "test sets are not used for selection")
CHAMPION = "champion"

MODEL_DESCRIPTION = (
    "Mammography mass classifier (mammodp): P(malignant) per patch. Each version carries its "
    "privacy record as tags (epsilon, delta, accountant, privacy_unit, noise_multiplier, "
    "sample_rate, steps) and what epsilon does not cover (validation split, tuning, synthetic "
    "data from a non-DP generator: see `synthetic_privacy`). Aliases: eps-<E> = best validation "
    "run at target budget E; champion = best among budgets <= promote.max_epsilon."
)


def alias_for(epsilon: float) -> str:
    """Registry alias of a budget: `eps-1`, `eps-0_5`, `eps-inf` (MLflow allows [A-Za-z0-9_-])."""
    return "eps-" + re.sub(r"[^\w-]", "_", format_epsilon(epsilon))


@dataclass
class Candidate:
    """A finished train run that may be promoted."""

    run_id: str
    run_name: str
    epsilon: float  # target budget
    val_auprc: float
    val_metric: str
    start_time: int
    tags: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def rank(self) -> tuple:
        """Sort key: best validation AUPRC first, then the earlier run (deterministic)."""
        return (-self.val_auprc, self.start_time, self.run_id)


def privacy_gaps(run) -> tuple[list[str], list[str]]:
    """(missing tags, missing params) of a run's privacy record."""
    tags, params = run.data.tags, run.data.params
    missing_tags = [t for t in REQUIRED_TAGS if not str(tags.get(t, "")).strip()]
    missing_params = [p for p in REQUIRED_PARAMS if not str(params.get(p, "")).strip()]
    return missing_tags, missing_params


def check_privacy_record(run) -> None:
    """Refuse a run whose privacy record is incomplete.

    Raises:
        PrivacyError: naming the run and its missing tags/params.
    """
    missing_tags, missing_params = privacy_gaps(run)
    if missing_tags or missing_params:
        what = []
        if missing_tags:
            what.append("tags " + ", ".join(missing_tags))
        if missing_params:
            what.append("params " + ", ".join(missing_params))
        raise PrivacyError(
            f"run {run.info.run_id} ({run.info.run_name}) lacks its privacy record: missing "
            f"{' and '.join(what)}; refusing to promote a model whose epsilon cannot be stated "
            "(retrain it with `mammodp train`, or delete the run)", field="run")


def collect_candidates(experiment: str) -> tuple[list[Candidate], list[dict]]:
    """Finished train runs of `experiment` with their validation AUPRC; plus skipped runs.

    Raises:
        DataError: the experiment has no finished train run.
        PrivacyError: a run lacks its privacy record.
    """
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    runs = [] if exp is None else mlflow.search_runs(
        experiment_ids=[exp.experiment_id],
        filter_string="tags.stage = 'train' and attributes.status = 'FINISHED'",
        output_format="list",
    )
    if not runs:
        raise DataError(f"no finished train runs in MLflow experiment {experiment!r}; run `mammodp train` first",
                        field="experiment")
    candidates, skipped = [], []
    for run in runs:
        check_privacy_record(run)
        tags, metrics = run.data.tags, run.data.metrics
        rid = run.info.run_id
        if tags["within_budget"].lower() != "true":
            skipped.append({"run_id": rid, "reason": "spent epsilon exceeded its target (within_budget=false)"})
            continue
        name = next((m for m in VALIDATION_METRICS if m in metrics and math.isfinite(metrics[m])), None)
        if name is None:
            skipped.append({"run_id": rid, "reason": "no finite validation AUPRC (" + ", ".join(VALIDATION_METRICS) + ")"})
            continue
        candidates.append(Candidate(
            run_id=rid, run_name=run.info.run_name or rid, epsilon=parse_epsilon(tags["epsilon"]),
            val_auprc=float(metrics[name]), val_metric=name, start_time=int(run.info.start_time or 0),
            tags=dict(tags), params=dict(run.data.params), metrics=dict(metrics),
        ))
    return candidates, sorted(skipped, key=lambda s: s["run_id"])


def best_per_budget(candidates: list[Candidate]) -> dict[float, Candidate]:
    """The best-validation candidate per target budget, budgets ascending (inf last)."""
    best: dict[float, Candidate] = {}
    for c in sorted(candidates, key=Candidate.rank):
        best.setdefault(c.epsilon, c)
    return dict(sorted(best.items()))


def choose_champion(best: dict[float, Candidate], max_epsilon: float) -> Candidate | None:
    """Best validation AUPRC among budgets <= max_epsilon (ties: the smaller budget)."""
    eligible = [c for e, c in best.items() if e <= max_epsilon]
    if not eligible:
        return None
    return min(eligible, key=lambda c: (-c.val_auprc, c.epsilon, c.start_time, c.run_id))


def _fmt(value) -> str:
    if isinstance(value, float):
        return format_epsilon(value) if math.isinf(value) else f"{value:.6g}"
    return str(value)


def version_tags(c: Candidate) -> dict[str, str]:
    """Tags of the registered version: privacy record, provenance, metrics, source run."""
    spent = c.metrics.get("epsilon")
    tags = {
        "epsilon": format_epsilon(c.epsilon),
        "epsilon_spent": _fmt(float(spent)) if spent is not None else ("inf" if math.isinf(c.epsilon) else "unknown"),
        "delta": c.tags["delta"],
        "within_budget": c.tags["within_budget"],
        **{k: c.params[k] for k in PRIVACY_PARAMS if k in c.params},
        "privacy_unit": c.tags["privacy_unit"],
        **{k: c.tags[k] for k in PROVENANCE_TAGS if k in c.tags},
        "val_auprc": _fmt(c.val_auprc),
        "val_metric": c.val_metric,
        **{k: _fmt(float(c.metrics[k])) for k in REPORTED_METRICS if k in c.metrics},
        "test_metrics": "reported only; not used for selection",
        "source_run_id": c.run_id,
        "source_run_name": c.run_name,
        "selection": SELECTION,
    }
    # "generator privacy": every version says it, also for regimes without synthetic data.
    tags.setdefault("synthetic_privacy", "none")
    return {k: str(v) for k, v in tags.items()}


def model_uri(run_id: str, name: str = "model") -> str:
    """URI of the model a run logged as `name`: its MLflow 3 logged model, else `runs:/`.

    MLflow 3 stores models logged in a run as logged models (`models:/m-...`), outside the
    run's artifacts; registering that URI directly avoids the `runs:/` indirection.
    """
    import mlflow

    outputs = mlflow.get_run(run_id).outputs
    for out in outputs.model_outputs if outputs is not None else []:
        if mlflow.get_logged_model(out.model_id).name == name:
            return f"models:/{out.model_id}"
    return f"runs:/{run_id}/{name}"


class _Registry:
    """The few registry calls promotion needs, each skipped when it would change nothing."""

    def __init__(self, name: str):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.name = name
        self.changes: list[str] = []

    def ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description=MODEL_DESCRIPTION)
            self.changes.append(f"created registered model {self.name}")
            return
        if (rm.description or "") != MODEL_DESCRIPTION:
            self.client.update_registered_model(self.name, description=MODEL_DESCRIPTION)
            self.changes.append("updated the model description")

    def version_for(self, c: Candidate) -> str:
        """The version registered from `c`'s run, registering it if there is none."""
        import mlflow
        from mlflow.exceptions import MlflowException

        existing = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{c.run_id}'")
        if existing:
            return str(min(int(v.version) for v in existing))
        try:
            mv = mlflow.register_model(model_uri(c.run_id), self.name)
        except MlflowException as exc:
            raise DataError(f"run {c.run_id} ({c.run_name}) has no logged model at 'model' ({exc.message})",
                            field="run") from exc
        self.changes.append(f"registered run {c.run_id} as version {mv.version}")
        return str(mv.version)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        current = self.client.get_model_version(self.name, version).tags
        for k, v in tags.items():
            if current.get(k) != v:
                self.client.set_model_version_tag(self.name, version, k, v)
                self.changes.append(f"version {version}: tag {k}={v}")

    def aliases(self) -> dict[str, str]:
        return {a: str(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}

    def set_alias(self, alias: str, version: str) -> None:
        if self.aliases().get(alias) != version:
            self.client.set_registered_model_alias(self.name, alias, version)
            self.changes.append(f"alias {alias} -> version {version}")

    def delete_alias(self, alias: str) -> None:
        if alias in self.aliases():
            self.client.delete_registered_model_alias(self.name, alias)
            self.changes.append(f"removed alias {alias}")


def run(cfg: Config, out: Path = Path("metrics/promote.json")) -> dict:
    """Promote the best validation run per budget; write what was promoted to `out`.

    Returns:
        The record written to `out`.

    Raises:
        DataError: no finished train runs, or a chosen run has no logged model.
        PrivacyError: a candidate run lacks its privacy record.
    """
    import mlflow

    from mammodp import tracking

    p = cfg.promote
    if not p.max_epsilon > 0:
        raise ConfigError(f"must be > 0 (inf allows non-private champions), got {p.max_epsilon}",
                          field="promote.max_epsilon")
    candidates, skipped = collect_candidates(cfg.experiment)
    best = best_per_budget(candidates)
    if not best:
        raise DataError("no train run can be promoted: " + "; ".join(f"{s['run_id']}: {s['reason']}" for s in skipped),
                        field="experiment")
    champion = choose_champion(best, p.max_epsilon)

    reg = _Registry(p.model_name)
    reg.ensure_model()
    promoted = {}
    for eps, c in best.items():
        version = reg.version_for(c)
        reg.set_tags(version, version_tags(c))
        alias = alias_for(eps)
        reg.set_alias(alias, version)
        promoted[alias] = {"version": version, "run_id": c.run_id, "run_name": c.run_name,
                           "epsilon": format_epsilon(eps), "regime": c.tags.get("regime", "unknown"),
                           "val_auprc": c.val_auprc, "val_metric": c.val_metric,
                           "synthetic_privacy": c.tags.get("synthetic_privacy", "none")}
    if champion is not None:
        reg.set_alias(CHAMPION, promoted[alias_for(champion.epsilon)]["version"])
    else:
        log.warning("no promoted budget is <= promote.max_epsilon=%s: alias %s removed",
                    format_epsilon(p.max_epsilon), CHAMPION)
        reg.delete_alias(CHAMPION)

    record = {
        "model_name": p.model_name,
        "selection": SELECTION,
        "max_epsilon": format_epsilon(p.max_epsilon),
        "aliases": promoted,
        "champion": ({"alias": alias_for(champion.epsilon), **promoted[alias_for(champion.epsilon)]}
                     if champion is not None else None),
        "candidates": len(candidates),
        "skipped": skipped,
        "uri": f"models:/{p.model_name}@{CHAMPION}",
    }
    if reg.changes:
        with tracking.start_run(cfg.experiment, "promote", name="promote",
                                params={"model_name": p.model_name, "max_epsilon": format_epsilon(p.max_epsilon)},
                                description="Registry changes made by `mammodp promote`."):
            mlflow.log_dict(record, "promote.json")
            mlflow.log_text("\n".join(reg.changes), "changes.txt")
    write_json(out, record)
    for alias, r in promoted.items():
        star = " (champion)" if champion is not None and record["champion"]["alias"] == alias else ""
        print(f"{p.model_name}@{alias} -> version {r['version']}: {r['regime']} run {r['run_id']}, "
              f"val AUPRC {r['val_auprc']:.3f}{star}")
    print(f"promote: {len(reg.changes)} registry change(s)" if reg.changes else "promote: registry already up to date")
    return record
