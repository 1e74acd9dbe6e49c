"""Stage `promote`: register the best validation run per budget and point registry aliases at it.

Selection reads only validation metrics (`best_val_auprc`, the value the training loop
selected its checkpoint on, else `final_val_auprc`); the internal and external test metrics
that `evaluate` adds to the runs are copied into version tags for the reader, never compared.

The registry cannot mislabel: a budget's alias goes only to a run whose END-TO-END guarantee
(`epsilon_total`: its own DP-SGD composed with its synthetic data's generator) is within that
budget. For a finite budget E a run qualifies only if
- its `epsilon_total` tag is a number <= E (not `not_covered`, not missing, not `inf`),
- its `within_budget` tag is `true` (set by `mammodp train` from the total),
- it used no not-covered synthetic data (`synthetic_privacy != not_covered`) and touched no
  private data without DP (`private_data_without_dp = false`) beyond what every run declares
  (the validation split; tuning, stated on the version).
Any run is within the budget inf (non-private). Runs of the `radiomics-linear` baseline (tag
`model_kind`) are skipped with their reason: the served pyfunc takes images, not radiomics features.

Which runs compete: in the pipeline (`--models models/classifier`, the CLI's default) only the
runs that trained the classifiers saved there, i.e. the models `dvc.lock` describes and `audit`
audits; a FINISHED run of earlier code, data or params stays in the experiment but can neither
win nor keep an alias (the report counts them). `--all-runs`: every finished train run.

For every target budget E found among the competing runs:
- the qualifying run with the highest validation AUPRC is registered as a version of
  `promote.model_name` (or its existing version is reused: one version per run);
- the version gets the privacy record as tags (epsilon, epsilon_total and its method, delta,
  accountant, privacy unit, noise, sample rate, steps, regime, generator privacy, tuning
  statement) plus its metrics and source run, and a description stating its guarantee;
- alias `eps-<E>` points at it. MLflow aliases allow only letters, digits, `_` and `-`, so
  the budget's text (`format_epsilon`) has every other character replaced by `_`:
  `eps-1`, `eps-0_5`, `eps-inf`.
Alias `champion` points at the best of those versions among budgets <= `promote.max_epsilon`
(ties: the smaller budget). If no budget qualifies, `champion` is removed rather than left on
a model outside the allowed budget. Alias `best-not-private` points at the best run that is
within no finite budget (not covered, non-private, or over its budget): registered under a
name that says so, never under a budget's alias. `promote` prints, per alias, which version
won, why, and what its epsilon covers.

A candidate run without its privacy record is refused (PrivacyError naming the run and what
is missing): a model whose epsilon cannot be stated must not be served.

Idempotent: a second promotion registers nothing, rewrites no tag and moves no alias, and
logs no MLflow run (a `promote` run is logged only when the registry changed, as its audit
trail). Registry aliases, never the deprecated stages.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from mammodp.config import Config, format_epsilon, parse_epsilon
from mammodp.errors import ConfigError, DataError, PrivacyError
from mammodp.io import write_json

log = logging.getLogger(__name__)

REQUIRED_TAGS = ("epsilon", "delta", "privacy_unit", "within_budget")
E2E_TAGS = ("epsilon_total", "epsilon_total_method", "epsilon_total_status", "tuning_statement")
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
# Train runs whose model the served pyfunc (images in, Swin out) cannot serve: tag model_kind -> why.
NOT_SERVABLE = {"radiomics-linear": "radiomics-linear baseline: the served model takes images and runs the Swin "
                                    "classifier; this model takes radiomics features (not promoted, evaluated only)"}
BEST_NOT_PRIVATE = "best-not-private"

MODEL_DESCRIPTION = (
    "Mammography mass classifier (mammodp): P(malignant) per patch. Guarantee: an alias eps-<E> "
    "(and champion) points only at a version whose END-TO-END epsilon (tag epsilon_total: its own "
    "DP-SGD composed with the DP generator of any synthetic data it used, at its delta) is <= E, "
    "for the real CBIS training records at the tagged privacy unit. Not covered by any epsilon: the "
    "validation split (model selection, threshold) and tuning on private data (tag tuning_statement). "
    "eps-inf = best non-private run; best-not-private = best run within no finite budget (for "
    "example trained on synthetic data from a generator without DP): it carries NO privacy guarantee. "
    "Each version carries its privacy record as tags and states its guarantee in its description."
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

    @property
    def budget_independent(self) -> bool:
        """One model for every budget (tag `budget_independent`: the synth regime)."""
        return str(self.tags.get("budget_independent", "")).lower() == "true"

    def rank(self) -> tuple:
        """Sort key: best validation AUPRC first, then the earlier run (deterministic)."""
        return (-self.val_auprc, self.start_time, self.run_id)

    @property
    def total_text(self) -> str:
        """The run's `epsilon_total` tag (`missing` for runs trained before it existed)."""
        return str(self.tags.get("epsilon_total", "missing"))

    def covered_within(self, budget: float) -> tuple[bool, str]:
        """(qualifies for the alias of `budget`, why not). See the module docstring."""
        if math.isinf(budget):
            return True, ""
        total = self.total_text
        if total == "missing":
            return False, "no epsilon_total recorded (trained before end-to-end accounting; retrain it)"
        if total == "not_covered":
            return False, "not covered end to end (epsilon_total=not_covered)"
        if self.tags.get("synthetic_privacy") == "not_covered":
            return False, "uses synthetic data from a generator trained without DP"
        if str(self.tags.get("private_data_without_dp", "")).lower() != "false":
            return False, "touched private data without DP (private_data_without_dp is not false)"
        try:
            value = float(total)
        except ValueError:
            return False, f"epsilon_total {total!r} is not a number"
        if not value <= budget * (1 + 1e-6):
            return False, f"epsilon_total {value:.4g} exceeds the budget {format_epsilon(budget)}"
        if str(self.tags.get("within_budget", "")).lower() != "true":
            return False, "within_budget is not true"
        return True, ""


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


def collect_candidates(experiment: str, only: set[str] | None = None) -> tuple[list[Candidate], list[dict], int]:
    """Finished train runs of `experiment` with their validation AUPRC; plus skipped runs.

    Args:
        experiment: the MLflow experiment.
        only: if given, the run ids that may compete (the pipeline's current models); other
            finished train runs (earlier code, data or params) are left out and only counted.

    Returns:
        (candidates, skipped runs with their reason, number of runs left out by `only`).

    Raises:
        DataError: the experiment has no finished train run.
        PrivacyError: a competing run lacks its privacy record.
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
    candidates, skipped, other = [], [], 0
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        rid = run.info.run_id
        if only is not None and rid not in only:
            other += 1
            continue
        check_privacy_record(run)
        if tags.get("model_kind") in NOT_SERVABLE:
            skipped.append({"run_id": rid, "reason": NOT_SERVABLE[tags["model_kind"]]})
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
    return candidates, sorted(skipped, key=lambda s: s["run_id"]), other


def best_per_budget(candidates: list[Candidate]) -> dict[float, Candidate]:
    """The best-validation candidate per target budget among those covered end to end within
    it, budgets ascending (inf last)."""
    best: dict[float, Candidate] = {}
    budgets = {c.epsilon for c in candidates}
    for c in sorted(candidates, key=Candidate.rank):
        # A budget-independent model (the synth regime: one model for every budget) competes at
        # every budget its end-to-end epsilon fits, as if it were that budget's cell.
        for b in (sorted(budgets) if c.budget_independent else (c.epsilon,)):
            if c.covered_within(b)[0]:
                best.setdefault(b, c if b == c.epsilon else replace(c, epsilon=b))
    return dict(sorted(best.items()))


def not_within_any_budget(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates that no finite budget's alias may hold (best first)."""
    return sorted((c for c in candidates if math.isinf(c.epsilon) or not c.covered_within(c.epsilon)[0]),
                  key=Candidate.rank)


def coverage_text(c: Candidate) -> str:
    """What the version's epsilon covers, in one sentence."""
    unit = c.tags.get("privacy_unit", "?")
    total = c.total_text
    if total in ("not_covered", "missing"):
        return (f"no epsilon covers it end to end (epsilon_total={total}; synthetic_privacy="
                f"{c.tags.get('synthetic_privacy', 'none')})")
    if total == "inf":
        return "no epsilon: trained on private data without DP"
    method = c.tags.get("epsilon_total_method", "?")
    return (f"epsilon_total {total} at delta {c.tags.get('delta')} ({method}) covers the real CBIS training "
            f"records ({unit} unit) through DP-SGD" + (" and its synthetic data's DP generator"
                                                        if c.tags.get("synthetic_privacy", "none") != "none" else "")
            + "; not covered: the validation split" + ("; tuning (tuning_statement)" if c.tags.get("tuning_statement")
                                                       else ""))


def guarantee_text(c: Candidate) -> str:
    """The registered version's description: its privacy guarantee in plain words."""
    head = (f"{c.tags.get('regime', '?')} classifier at target epsilon {format_epsilon(c.epsilon)} "
            f"(run {c.run_name}, {c.run_id}). ")
    body = coverage_text(c)
    tail = "" if not c.tags.get("tuning_statement") else " Tuning: " + str(c.tags["tuning_statement"])
    return head + "Guarantee: " + body + "." + tail


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
        **{k: c.tags[k] for k in E2E_TAGS if k in c.tags},
        "epsilon_total": c.total_text,
        "covers": coverage_text(c),
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

    def set_tags(self, version: str, tags: dict[str, str], description: str | None = None) -> None:
        mv = self.client.get_model_version(self.name, version)
        for k, v in tags.items():
            if mv.tags.get(k) != v:
                self.client.set_model_version_tag(self.name, version, k, v)
                self.changes.append(f"version {version}: tag {k}={v}")
        if description is not None and (mv.description or "") != description:
            self.client.update_model_version(self.name, version, description=description)
            self.changes.append(f"version {version}: description")

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


def _why(alias: str, c: Candidate, pool: list[Candidate]) -> str:
    """Why `c` won `alias`: the rule and the field it won in."""
    if alias == BEST_NOT_PRIVATE:
        return f"highest validation AUPRC among {len(pool)} run(s) within no finite budget"
    if alias == CHAMPION:
        return "highest validation AUPRC among the budget winners <= promote.max_epsilon"
    if math.isinf(c.epsilon):
        return f"highest validation AUPRC among {len(pool)} non-private run(s) (target inf)"
    return (f"highest validation AUPRC among {len(pool)} run(s) at target {format_epsilon(c.epsilon)} "
            f"covered end to end within it")


def run(cfg: Config, out: Path = Path("metrics/promote.json"), report: Path = Path("reports/promote.json"),
        models: Path | None = None) -> dict:
    """Promote the best covered validation run per budget; write what was promoted.

    With `models` (the pipeline passes `models/classifier`), only the runs that trained the
    classifiers saved there compete: the pipeline's current models. A run of earlier code,
    data or params, still FINISHED in the experiment, can then neither win an alias over them
    nor keep one (its model would not be what `dvc.lock` describes, nor what `audit` audits).
    Without it, every finished train run of the experiment competes.

    Writes `out` (numbers only: a DVC metric) and `report` (the full record: aliases, versions,
    why each won, what its epsilon covers, runs that qualified for no budget).

    Returns:
        The full record (as written to `report`).

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
    only = None
    if models is not None:
        from mammodp.io import saved_classifiers

        only = {str(meta.get("run_id")) for _, meta in saved_classifiers(models) if meta.get("run_id")}
        if not only:
            raise DataError("no trained classifiers to promote (run the train stages first)", path=models)
    candidates, skipped, other = collect_candidates(cfg.experiment, only)
    if not candidates:
        raise DataError("no train run can be promoted: " + "; ".join(f"{s['run_id']}: {s['reason']}" for s in skipped),
                        field="experiment")
    best = best_per_budget(candidates)
    champion = choose_champion(best, p.max_epsilon)
    outside = not_within_any_budget(candidates)
    not_eligible = sorted(({"run_id": c.run_id, "run_name": c.run_name, "epsilon": format_epsilon(c.epsilon),
                            "reason": c.covered_within(c.epsilon)[1]}
                           for c in candidates if not c.covered_within(c.epsilon)[0]), key=lambda r: r["run_id"])

    reg = _Registry(p.model_name)
    reg.ensure_model()
    winners: dict[str, tuple[Candidate, list[Candidate]]] = {}
    for eps, c in best.items():
        winners[alias_for(eps)] = (c, [x for x in candidates if x.epsilon == eps and x.covered_within(eps)[0]])
    if champion is not None:
        winners[CHAMPION] = (champion, list(best.values()))
    if outside:
        winners[BEST_NOT_PRIVATE] = (outside[0], outside)

    promoted: dict[str, dict] = {}
    for alias, (c, pool) in winners.items():
        version = reg.version_for(c)
        reg.set_tags(version, version_tags(c), description=guarantee_text(c))
        reg.set_alias(alias, version)
        promoted[alias] = {"version": version, "run_id": c.run_id, "run_name": c.run_name,
                           "epsilon": format_epsilon(c.epsilon), "epsilon_total": c.total_text,
                           "regime": c.tags.get("regime", "unknown"), "val_auprc": c.val_auprc,
                           "val_metric": c.val_metric, "synthetic_privacy": c.tags.get("synthetic_privacy", "none"),
                           "why": _why(alias, c, pool), "covers": coverage_text(c)}
    # A budget alias (or champion) left from an earlier promotion that no qualifying run holds now
    # would mislabel its version: remove it.
    for alias in sorted(reg.aliases()):
        if (alias.startswith("eps-") or alias in (CHAMPION, BEST_NOT_PRIVATE)) and alias not in promoted:
            log.warning("alias %s: no run qualifies any more; removed", alias)
            reg.delete_alias(alias)
    if champion is None:
        log.warning("no covered budget winner is <= promote.max_epsilon=%s: no %s", format_epsilon(p.max_epsilon),
                    CHAMPION)

    record = {
        "model_name": p.model_name,
        "selection": SELECTION,
        "rule": "eps-<E> and champion: end-to-end epsilon (epsilon_total) within E; best-not-private: "
                "within no finite budget",
        "max_epsilon": format_epsilon(p.max_epsilon),
        "aliases": promoted,
        "champion": ({"alias": CHAMPION, **promoted[CHAMPION]} if CHAMPION in promoted else None),
        "candidates": len(candidates),
        "not_eligible": not_eligible,
        "skipped": skipped,
        "scope": (f"the runs of the {len(only)} classifiers under {models}; {other} other finished train run(s) "
                  "of the experiment (earlier code, data or params) left out" if only is not None
                  else "every finished train run of the experiment"),
        "uri": f"models:/{p.model_name}@{CHAMPION}",
    }
    numbers: dict[str, float] = {"candidates": len(candidates), "not_eligible": len(not_eligible),
                                 "skipped": len(skipped), "other_runs": other}
    for alias, r in promoted.items():
        numbers[f"{alias}/version"] = int(r["version"])
        numbers[f"{alias}/val_auprc"] = float(r["val_auprc"])
        if r["epsilon_total"] not in ("not_covered", "missing", "inf"):
            numbers[f"{alias}/epsilon_total"] = float(r["epsilon_total"])
    if reg.changes:
        with tracking.start_run(cfg.experiment, "promote", name="promote",
                                params={"model_name": p.model_name, "max_epsilon": format_epsilon(p.max_epsilon)},
                                description="Registry changes made by `mammodp promote`."):
            mlflow.log_dict(record, "promote.json")
            mlflow.log_text("\n".join(reg.changes), "changes.txt")
    write_json(report, record)
    write_json(out, numbers)
    for alias, r in promoted.items():
        print(f"{p.model_name}@{alias} -> version {r['version']}: {r['regime']} run {r['run_name']} ({r['run_id']}), "
              f"val AUPRC {r['val_auprc']:.3f}; won: {r['why']}; covers: {r['covers']}")
    for r in not_eligible:
        print(f"  not eligible for eps-{r['epsilon']}: {r['run_name']} ({r['run_id']}): {r['reason']}")
    print(f"promote: {len(reg.changes)} registry change(s)" if reg.changes else "promote: registry already up to date")
    return record
