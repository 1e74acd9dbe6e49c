"""Stage `tune`: an Optuna study per privacy budget over clipping norm, noise and learning rate.

For a budget E (delta, accountant and privacy unit from `dp`):
- each trial draws C (`max_grad_norm`), sigma (`noise_multiplier`) and the learning rate
  log-uniformly from the `tune` ranges; epochs then follow from the accountant: the largest
  count (at most `tune.max_epochs`) whose epsilon at that sigma and sample rate is <= E. The
  sigma range is raised, once per study, to the smallest sigma for which one epoch fits E, so
  that no trial is wasted on an infeasible noise level;
- a trial is one `mammodp.training.fit` of the `real` regime with DP-SGD on the private CBIS
  training split; its objective is the validation AUPRC of its best epoch (the checkpoint the
  training loop keeps), read on the real validation split or, with `tune.data: synthetic`, on
  a label-balanced synthetic hold-out;
- MedianPruner stops trials whose per-epoch validation AUPRC trails the median;
- every trial is a nested MLflow run under the study's run (params, per-epoch metrics, final
  epsilon), logged by a small callback of our own; a trial's final epsilon above E stops the
  study with a PrivacyError: it would be a bug in the accounting.

The study is persistent (`tune.storage`: SQLite by default, any SQLAlchemy URL so that
workers on several machines share it), named after the budget and a hash of everything that
defines it (search space, model, DP and training settings, data), and loaded if it exists:
each invocation ADDS `tune.n_trials` trials, and trials left running by an interrupted worker
are failed after a missed heartbeat and retried once. The sampler is TPE whose random state
is drawn afresh for every trial from (`seed`, the trial's number): the storage hands out trial
numbers atomically, so concurrent workers on one study never draw the same parameters (two
workers seeded alike once both saw zero stored trials and ran identical trials, each charged
to the privacy cost), while a study run again on the same storage draws the same values
(up to the DP noise, seeded from the OS unless `dp.reproducible_noise`).

Privacy cost of tuning, stated in the result and on the study's run: how many trials trained
on private data, which data scored them, and what that means for the guarantee.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mammodp.config import Config, format_epsilon
from mammodp.data.datasets import PatchTable, read_manifest_table
from mammodp.errors import ConfigError, DataError, PrivacyError
from mammodp.io import write_json

log = logging.getLogger(__name__)

# Fraction of slack allowed between a trial's epsilon and the budget (float rounding only).
_EPS_SLACK = 1e-9
# Optuna RDB heartbeat: a trial whose worker stopped beating this long ago is failed (and retried).
_HEARTBEAT_S = 30
_GRACE_S = 120
# Seconds a worker that created the study's MLflow run waits before checking for a twin.
_STUDY_RUN_SETTLE_S = 2.0


@dataclass
class TuneData:
    """What the trials train on and are scored on."""

    train: PatchTable  # private: real CBIS training patches (DP-SGD)
    val: PatchTable  # the objective's data: real validation split or synthetic hold-out
    objective_data: str  # real | synthetic
    description: str  # one line for the summary
    fingerprint: dict  # manifest hashes and sizes, part of the study's identity
    provenance: dict  # generator privacy of the synthetic hold-out ({} for real)


@dataclass(frozen=True)
class SearchSpace:
    """The per-study search space and the sampling facts epochs are derived from."""

    lr: tuple[float, float]
    max_grad_norm: tuple[float, float]
    noise_multiplier: tuple[float, float]  # low raised to the smallest sigma that fits 1 epoch
    noise_multiplier_configured: tuple[float, float]
    sample_rate: float
    steps_per_epoch: int
    n_records: int
    max_epochs: int


# --------------------------------------------------------------------------- accounting


def epsilon_after(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` DP-SGD steps, computed by the accountant the training engine uses.

    The accountant's own fallback (PRV -> RDP on failure) applies, as in training.
    """
    from mammodp.privacy.accountant import make_accountant

    if steps <= 0:
        return 0.0
    acc = make_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return acc.epsilon(delta)


def max_epochs_within_budget(epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                             steps_per_epoch: int, accountant: str, max_epochs: int) -> tuple[int, float]:
    """The largest epoch count <= max_epochs whose epsilon is <= the budget, and that epsilon.

    Epsilon grows with the number of steps, so a bisection over epochs finds it. Returns
    (0, 0.0) when even one epoch exceeds the budget.
    """
    def eps(e: int) -> float:
        return epsilon_after(accountant, noise_multiplier, sample_rate, e * steps_per_epoch, delta)

    lo, hi = 0, max_epochs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if eps(mid) <= epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo, eps(lo)


def search_space(cfg: Config, epsilon: float, n_records: int) -> SearchSpace:
    """The study's search space at budget `epsilon` for `n_records` private records.

    Raises:
        ConfigError: the batch is larger than the data, or no sigma in the range fits one epoch.
    """
    from mammodp.privacy.accountant import calibrate_noise
    from mammodp.privacy.sampler import steps_per_epoch

    t, dp = cfg.tune, cfg.dp
    if not 0 < cfg.train.batch_size <= n_records:
        raise ConfigError(f"expected batch size {cfg.train.batch_size} must be in (0, {n_records}] "
                          f"(the number of {dp.privacy_unit} records)", field="train.batch_size")
    q = cfg.train.batch_size / n_records
    spe = steps_per_epoch(q)
    try:
        # The smallest sigma whose single epoch stays within the budget (to Opacus' tolerance).
        sigma_one_epoch = calibrate_noise(epsilon, dp.delta, q, spe, dp.accountant)
    except PrivacyError as exc:
        raise ConfigError(f"budget epsilon={format_epsilon(epsilon)} cannot cover one epoch: {exc}",
                          field="tune.epsilons") from exc
    lo, hi = t.noise_multiplier
    if sigma_one_epoch > hi:
        raise ConfigError(
            f"at q={q:.4g} ({spe} steps per epoch, delta={dp.delta:g}, {dp.accountant}) one epoch within "
            f"epsilon={format_epsilon(epsilon)} needs sigma >= {sigma_one_epoch:.4g}, above the range "
            f"[{lo:g}, {hi:g}]; raise its upper end", field="tune.noise_multiplier")
    return SearchSpace(lr=t.lr, max_grad_norm=t.max_grad_norm, noise_multiplier=(max(lo, sigma_one_epoch), hi),
                       noise_multiplier_configured=(lo, hi), sample_rate=q, steps_per_epoch=spe,
                       n_records=n_records, max_epochs=t.max_epochs)


# --------------------------------------------------------------------------- data


def _balanced_sample(df, size: int, seed: int):
    """Up to `size` rows, half per label where possible (seeded)."""
    if size <= 0 or size >= len(df):
        return df
    rng = np.random.default_rng(seed)
    per_label = size // 2
    parts = []
    for _, group in sorted(df.groupby("label"), key=lambda g: g[0]):
        take = min(len(group), per_label)
        parts.append(group.iloc[np.sort(rng.choice(len(group), size=take, replace=False))])
    import pandas as pd

    return pd.concat(parts)


def load_tune_data(cfg: Config) -> TuneData:
    """The private training split and the objective's data (`tune.data`).

    Raises:
        DataError: a manifest is missing, a split is empty, or the synthetic set has one label.
    """
    from mammodp import tracking
    from mammodp.stages.train import cbis_manifest, synthetic_manifest, synthetic_provenance

    manifest = cbis_manifest(cfg)
    df = read_manifest_table(manifest)
    train = PatchTable.from_frame(df[df["split"] == "train"])
    fingerprint = {"cbis_manifest": tracking.manifest_hash(manifest), "n_train": len(train)}
    if cfg.tune.data == "real":
        val = PatchTable.from_frame(df[df["split"] == "val"])
        fingerprint["n_val"] = len(val)
        return TuneData(train, val, "real", f"real validation split ({len(val)} patches)", fingerprint, {})

    sm = synthetic_manifest(cfg)
    sdf = read_manifest_table(sm)
    if sdf["label"].nunique() < 2:
        raise DataError("the synthetic set holds one label only: AUPRC on it is undefined", path=sm)
    hold_out = _balanced_sample(sdf, cfg.tune.synthetic_val_size, cfg.seed)
    val = PatchTable.from_frame(hold_out)
    if val.images.shape[-2:] != train.images.shape[-2:]:
        raise DataError(f"synthetic patches are {val.images.shape[-2:]} but real ones {train.images.shape[-2:]}; "
                        "regenerate the synthetic set", path=sm)
    fingerprint.update({"synthetic_manifest": tracking.manifest_hash(sm), "n_val": len(val)})
    return TuneData(train, val, "synthetic", f"synthetic hold-out ({len(val)} patches, label-balanced)",
                    fingerprint, synthetic_provenance(sdf))


# --------------------------------------------------------------------------- study


def study_key(cfg: Config, epsilon: float, data: TuneData) -> dict[str, Any]:
    """Everything that defines a study's trials (not how many are run, nor where stored)."""
    t = asdict(cfg.tune)
    for k in ("epsilons", "n_trials", "storage"):
        t.pop(k)
    tr = cfg.train
    return {
        "epsilon": format_epsilon(epsilon), "tune": t, "model": asdict(cfg.model), "dp": asdict(cfg.dp),
        "train": {"batch_size": tr.batch_size, "physical_batch_size": tr.physical_batch_size,
                  "weight_decay": tr.weight_decay, "label_smoothing": tr.label_smoothing, "flip": tr.flip,
                  "amp": tr.amp},
        "seed": cfg.seed, "data": data.fingerprint,
    }


def study_name(cfg: Config, epsilon: float, data: TuneData) -> str:
    """`mammodp-tune/eps=<E>/<hash of the study key>`."""
    key = json.dumps(study_key(cfg, epsilon, data), sort_keys=True, default=str)
    return f"mammodp-tune/eps={format_epsilon(epsilon)}/{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def redact(url: str) -> str:
    """A storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any unparsable URL: show nothing of it rather than a secret
        return "<unparsable storage URL>"


def open_storage(url: str):
    """Optuna RDB storage with heartbeats, so an interrupted worker's trial is retried once.

    Raises:
        ConfigError: the URL is not a usable SQLAlchemy database URL.
    """
    import optuna
    from sqlalchemy.exc import ArgumentError, OperationalError

    import contextlib
    import fcntl

    guard: Any = contextlib.nullcontext()
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        db = Path(url.removeprefix("sqlite:///")).expanduser()
        db.parent.mkdir(parents=True, exist_ok=True)
        # Workers started together on a fresh SQLite file would both create Optuna's tables
        # (and one fail): they take turns, by an flock on the file (SQLite's own locks are
        # fcntl locks, which flock does not touch).
        guard = contextlib.closing(open(db, "a+b"))
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            with warnings.catch_warnings(), guard as f:
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if f is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=_HEARTBEAT_S, grace_period=_GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except (IntegrityError, ProgrammingError) as exc:
            # Workers started together on an empty server database race to create Optuna's tables
            # (on PostgreSQL: "duplicate key ... pg_type"): the loser retries and finds them made.
            if attempt == 4:
                raise ConfigError(f"cannot create the Optuna tables in {redact(url)}: {exc}",
                                  field="tune.storage") from exc
            time.sleep(0.5 + attempt)
            if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
                guard = contextlib.closing(open(db, "a+b"))
        except (ArgumentError, OperationalError, ValueError, ImportError) as exc:
            raise ConfigError(f"cannot open Optuna storage {redact(url)}: {exc}", field="tune.storage") from exc


def trial_seed(seed: int, trial_number: int) -> int:
    """The sampler's seed for one trial: a function of the study's seed and the trial's number."""
    return int(np.random.SeedSequence([int(seed), int(trial_number)]).generate_state(1)[0])


def trial_seeded_tpe(seed: int, n_startup_trials: int):
    """A TPE sampler re-seeded for each trial from (`seed`, trial number): see the module doc.

    Delegates to a fresh `TPESampler(seed=trial_seed(seed, trial.number))` per trial; TPE keeps
    no state between trials other than its RNG, so this is TPE with per-trial randomness.
    """
    import optuna

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._inner = self._make(0)

        def _make(self, number: int):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.TPESampler(seed=trial_seed(seed, number), n_startup_trials=n_startup_trials)

        def before_trial(self, study, trial) -> None:
            self._inner = self._make(trial.number)
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:  # Optuna calls this for n_jobs > 1: per-trial seeds already differ
            pass

    return TrialSeededTPE()


def open_study(cfg: Config, name: str, storage):
    """Create or load the study; TPE draws per trial from (`seed`, trial number)."""
    import optuna

    t = cfg.tune
    sampler = trial_seeded_tpe(cfg.seed, t.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=t.pruner_startup_trials,
                                         n_warmup_steps=t.pruner_warmup_epochs)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def privacy_statement(epsilon: float, delta: float, data: TuneData, n_private: int, n_val_private: int) -> str:
    """What the study's privacy cost is, in words."""
    e = format_epsilon(epsilon)
    text = (
        f"{n_private} trial(s) trained with DP-SGD on the private CBIS training split, each within "
        f"(epsilon={e}, delta={delta:g}). Choosing the best of them and releasing its hyper-parameters "
        f"is itself a computation on those records that the per-trial epsilon does not cover: by basic "
        f"composition the study as a whole is bounded only by ({n_private} x {e}, {n_private} x {delta:g}); "
        "tighter private-selection bounds need a randomised number of trials, which this study does not use. "
    )
    if data.objective_data == "real":
        text += (f"Trials were scored on the real validation split without DP ({n_val_private} trial(s) read "
                 "it): the validation patients are covered by no epsilon.")
    else:
        gen = data.provenance.get("synthetic_privacy", "unknown")
        text += ("Trials were scored on a synthetic hold-out: no real validation record was read. The "
                 f"synthetic data are covered only as far as their generator was (synthetic_privacy={gen}).")
    return text


# --------------------------------------------------------------------------- trials


def suggest(trial, space: SearchSpace) -> tuple[float, float, float]:
    """One trial's (lr, C, sigma), each log-uniform over the study's range."""
    lr = trial.suggest_float("lr", *space.lr, log=True)
    clip = trial.suggest_float("max_grad_norm", *space.max_grad_norm, log=True)
    sigma = trial.suggest_float("noise_multiplier", *space.noise_multiplier, log=True)
    return lr, clip, sigma


def _objective(cfg: Config, epsilon: float, data: TuneData, space: SearchSpace, parent_run_id: str,
               name: str, device):
    """The Optuna objective: one DP training run per trial, reported epoch by epoch."""
    import mlflow
    import optuna

    from mammodp import tracking
    from mammodp.models.swin import create_classifier
    from mammodp.runtime import seed_everything
    from mammodp.stages.train import fit_spec
    from mammodp.training import fit

    dp = cfg.dp
    eps_txt = format_epsilon(epsilon)

    def objective(trial: optuna.Trial) -> float:
        lr, clip, sigma = suggest(trial, space)
        epochs, predicted = max_epochs_within_budget(epsilon, dp.delta, sigma, space.sample_rate,
                                                     space.steps_per_epoch, dp.accountant, space.max_epochs)
        trial.set_user_attr("epochs", epochs)
        trial.set_user_attr("steps", epochs * space.steps_per_epoch)
        trial.set_user_attr("predicted_epsilon", predicted)
        if epochs < 1:  # cannot happen above the raised sigma floor; never train over budget
            trial.set_user_attr("skipped", "one epoch exceeds the budget at this sigma")
            raise optuna.TrialPruned("one epoch exceeds the budget at this noise multiplier")

        seed_everything(cfg.seed)
        spec = replace(fit_spec(cfg, epsilon, cfg.seed, {"lr": lr, "max_grad_norm": clip,
                                                         "noise_multiplier": sigma, "epochs": epochs}),
                       synth_ratio=0.0)
        model = create_classifier(cfg.model.preset, pretrained_weights=cfg.model.pretrained_weights,
                                  mode=cfg.model.mode)
        tags = {"epsilon": eps_txt, "delta": dp.delta, "privacy_unit": dp.privacy_unit, "regime": "real",
                "study_name": name, "trial": trial.number, "objective_data": data.objective_data}
        params = {"lr": lr, "max_grad_norm": clip, "noise_multiplier": sigma, "epochs": epochs,
                  "steps": epochs * space.steps_per_epoch, "sample_rate": space.sample_rate,
                  "accountant": dp.accountant, "delta": dp.delta, "privacy_unit": dp.privacy_unit}
        last: dict = {}
        pruned = False
        with tracking.start_run(cfg.experiment, "tune-trial", name=f"tune/eps={eps_txt}/trial={trial.number}",
                                tags=tags, params=params, nested=True, parent_run_id=parent_run_id) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            trial.set_user_attr("touched_private_train", True)

            def on_epoch(rec: dict) -> None:
                last.update(rec)
                tracking.log_metrics({k: rec[k] for k in ("val_auprc", "epsilon", "train_loss")}, step=rec["epoch"])
                _check_budget(rec["epsilon"], epsilon, trial.number)
                trial.report(rec["val_auprc"], rec["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {rec['epoch'] + 1}")

            try:
                res = fit(model, spec, private=data.train, public=None, val=data.val, device=device,
                          on_epoch=on_epoch, progress=False, desc=f"trial {trial.number}")
                final_eps, value, best_epoch = float(res.privacy["epsilon"]), float(res.best_val_auprc), res.best_epoch
            except optuna.TrialPruned:
                pruned = True
                final_eps, value, best_epoch = float(last["epsilon"]), float("nan"), -1
            _check_budget(final_eps, epsilon, trial.number)
            trial.set_user_attr("epsilon", final_eps)
            tracking.log_metrics({"final_epsilon": final_eps, "epochs_run": last.get("epoch", -1) + 1})
            if not pruned:
                tracking.log_metrics({"best_val_auprc": value, "best_epoch": best_epoch})
            mlflow.set_tag("trial_state", "PRUNED" if pruned else "COMPLETE")
        if pruned:
            raise optuna.TrialPruned(f"trial {trial.number} pruned")
        return value

    return objective


def _check_budget(spent: float, epsilon: float, trial: int) -> None:
    """A trial's epsilon above the budget is a bug in epoch selection or accounting: stop."""
    if not spent <= epsilon * (1 + _EPS_SLACK):
        raise PrivacyError(f"trial {trial} spent epsilon {spent:.6g} above the budget {format_epsilon(epsilon)}; "
                           "this is a bug in the tuner's accounting", field="tune")


# --------------------------------------------------------------------------- results


def _plots(study) -> dict[str, Any]:
    """Optimisation history and parameter importance as matplotlib figures (None if impossible)."""
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    figs: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figs["optimization_history"] = plot_optimization_history(study).figure
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
            try:
                figs["param_importances"] = plot_param_importances(study).figure
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # degenerate values: no importance
                log.warning("parameter importance not computed: %s", exc)
    for fig in figs.values():
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
    return figs


def summarise(study, cfg: Config, epsilon: float, data: TuneData, space: SearchSpace, run_id: str) -> dict:
    """The study's result: best params, trial counts, privacy cost (written to metrics/tune)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    n_private = sum(bool(t.user_attrs.get("touched_private_train")) for t in trials)
    n_val_private = n_private if data.objective_data == "real" else 0
    spent = [t.user_attrs["epsilon"] for t in trials if "epsilon" in t.user_attrs]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    return {
        "epsilon": format_epsilon(epsilon),
        "delta": cfg.dp.delta,
        "accountant": cfg.dp.accountant,
        "privacy_unit": cfg.dp.privacy_unit,
        "study_name": study.study_name,
        "storage": redact(cfg.tune.storage),
        "objective": "validation AUPRC of the trial's best epoch (malignant positive)",
        "objective_data": data.objective_data,
        "objective_data_description": data.description,
        "best_params": None if best is None else {
            "lr": best.params["lr"], "max_grad_norm": best.params["max_grad_norm"],
            "noise_multiplier": best.params["noise_multiplier"], "epochs": int(best.user_attrs["epochs"]),
        },
        "best_value": None if best is None else float(best.value),
        "best_trial": None if best is None else best.number,
        "best_trial_epsilon": None if best is None else float(best.user_attrs["epsilon"]),
        "best_trial_run_id": None if best is None else best.user_attrs.get("mlflow_run_id"),
        "trials": {"total": len(trials), **counts},
        "private_train_trials": n_private,
        "private_validation_trials": n_val_private,
        "max_trial_epsilon": max(spent) if spent else 0.0,
        "search_space": {
            "lr": list(space.lr), "max_grad_norm": list(space.max_grad_norm),
            "noise_multiplier": list(space.noise_multiplier),
            "noise_multiplier_configured": list(space.noise_multiplier_configured),
            "epochs": f"largest count <= {space.max_epochs} with epsilon <= {format_epsilon(epsilon)}",
        },
        "sample_rate": space.sample_rate,
        "steps_per_epoch": space.steps_per_epoch,
        "private_records": space.n_records,
        "privacy_statement": privacy_statement(epsilon, cfg.dp.delta, data, n_private, n_val_private),
        **({"synthetic_privacy": data.provenance.get("synthetic_privacy")} if data.provenance else {}),
        "mlflow_run_id": run_id,
    }


def _study_run(cfg: Config, name: str, epsilon: float, data: TuneData, space: SearchSpace) -> str:
    """Find or create the study's parent MLflow run (one per study, resumed by every worker)."""
    from mammodp import tracking
    from mammodp.config import flatten

    query = f"tags.stage = 'tune' and tags.study_name = '{name}'"
    found = tracking.find_runs(cfg.experiment, query, order_by=["attributes.start_time ASC"])
    if len(found):
        return str(found.iloc[0]["run_id"])
    mine = _create_study_run(cfg, name, epsilon, data, space)
    # Workers started together (a shared storage) may each have created one: after a pause that
    # lets concurrent creations land, all keep the earliest (ties: smallest id), the rest delete theirs.
    time.sleep(_STUDY_RUN_SETTLE_S)
    found = tracking.find_runs(cfg.experiment, query)
    winner = min(zip(found["start_time"], found["run_id"]))[1] if len(found) else mine
    if winner != mine:
        import mlflow

        mlflow.MlflowClient().delete_run(mine)
        log.info("study %s already had its run %s (created concurrently): using it", name, winner)
    return str(winner)


def _create_study_run(cfg: Config, name: str, epsilon: float, data: TuneData, space: SearchSpace) -> str:
    from mammodp import tracking
    from mammodp.config import flatten

    key = study_key(cfg, epsilon, data)
    with tracking.start_run(
        cfg.experiment, "tune", name=f"tune/eps={format_epsilon(epsilon)}",
        tags={"study_name": name, "epsilon": format_epsilon(epsilon), "delta": cfg.dp.delta,
              "privacy_unit": cfg.dp.privacy_unit, "objective_data": data.objective_data,
              "storage": redact(cfg.tune.storage)},
        params={**flatten(key), "sample_rate": space.sample_rate, "steps_per_epoch": space.steps_per_epoch,
                "noise_multiplier_floor": space.noise_multiplier[0]},
        description=f"Optuna study {name}: C, sigma and lr at epsilon <= {format_epsilon(epsilon)}; "
                    "each trial is a nested run.",
    ) as run:
        return run.info.run_id


def tune_metrics(summary: dict) -> dict[str, float]:
    """The study's numbers for `dvc metrics show` (the full result goes to reports/tune/)."""
    best = summary["best_params"] or {}
    out = {
        "best_value": summary["best_value"],
        "best_lr": best.get("lr"), "best_max_grad_norm": best.get("max_grad_norm"),
        "best_noise_multiplier": best.get("noise_multiplier"), "best_epochs": best.get("epochs"),
        "best_trial_epsilon": summary["best_trial_epsilon"],
        "trials": summary["trials"]["total"], "trials_complete": summary["trials"]["complete"],
        "trials_pruned": summary["trials"]["pruned"],
        "private_train_trials": summary["private_train_trials"],
        "private_validation_trials": summary["private_validation_trials"],
        "max_trial_epsilon": summary["max_trial_epsilon"],
        "sample_rate": summary["sample_rate"],
    }
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def run(cfg: Config, epsilon: float, out: Path | None = None, report: Path | None = None) -> dict:
    """Add `tune.n_trials` trials to the budget's study and write its result to `out`.

    Args:
        cfg: the whole config.
        epsilon: the budget (finite).
        out: numbers-only result (default `metrics/tune/eps=<E>.json`).
        report: full result: best params, search space, privacy statement
            (default `reports/tune/eps=<E>.json`; `mammodp train --tuned` reads it).

    Returns:
        The result written to `out`.

    Raises:
        ConfigError: a non-finite budget, an unusable storage or an infeasible search space.
        DataError: missing or unusable data.
        PrivacyError: a trial spent more than the budget (a bug).
    """
    import matplotlib.pyplot as plt
    import mlflow
    import optuna

    from mammodp import tracking
    from mammodp.runtime import claim_gpu, resolve_device

    claim_gpu()  # one GPU per concurrent worker of a DVC queue ($MAMMODP_GPU_POOL)
    if not (0 < epsilon < math.inf):
        raise ConfigError("tuning needs a finite budget: noise is what it tunes (non-private runs use train.*)",
                          field="epsilon")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are reported by our own line and MLflow
    eps_txt = format_epsilon(epsilon)
    out = Path(out or Path("metrics/tune") / f"eps={eps_txt}.json")
    report = Path(report or Path("reports/tune") / f"eps={eps_txt}.json")
    data = load_tune_data(cfg)
    n_records = int(np.unique(data.train.record_ids(cfg.dp.privacy_unit)).size)
    space = search_space(cfg, epsilon, n_records)
    name = study_name(cfg, epsilon, data)
    study = open_study(cfg, name, open_storage(cfg.tune.storage))
    parent = _study_run(cfg, name, epsilon, data, space)
    device = resolve_device(cfg.train.device)
    log.info("study %s: %d trial(s) stored, adding %d; sigma in [%.4g, %.4g], q=%.4g",
             name, len(study.trials), cfg.tune.n_trials, *space.noise_multiplier, space.sample_rate)

    with tracking.start_run(cfg.experiment, "tune", run_id=parent):
        study.optimize(_objective(cfg, epsilon, data, space, parent, name, device),
                       n_trials=cfg.tune.n_trials, gc_after_trial=True)
        summary = summarise(study, cfg, epsilon, data, space, parent)
        tracking.log_metrics({"best_value": summary["best_value"], "n_trials": summary["trials"]["total"],
                              "n_complete": summary["trials"]["complete"], "n_pruned": summary["trials"]["pruned"],
                              "private_train_trials": summary["private_train_trials"],
                              "private_validation_trials": summary["private_validation_trials"],
                              "max_trial_epsilon": summary["max_trial_epsilon"]},
                             step=summary["trials"]["total"])
        mlflow.set_tags({"private_train_trials": summary["private_train_trials"],
                         "private_validation_trials": summary["private_validation_trials"],
                         "privacy_statement": summary["privacy_statement"][:5000]})
        for fname, fig in _plots(study).items():
            tracking.log_figure(fig, f"plots/{fname}.png")
            plt.close(fig)
        mlflow.log_dict(summary, "tune/summary.json")
    write_json(report, summary)
    write_json(out, tune_metrics(summary))

    if summary["best_params"] is None:
        log.warning("study %s has no complete trial yet: %s holds no best params", name, out)
        print(f"tune eps={eps_txt}: no complete trial in {summary['trials']['total']} -> {out}")
    else:
        bp = summary["best_params"]
        print(f"tune eps={eps_txt}: best val AUPRC {summary['best_value']:.3f} (trial {summary['best_trial']}: "
              f"lr={bp['lr']:.3g}, C={bp['max_grad_norm']:.3g}, sigma={bp['noise_multiplier']:.3g}, "
              f"{bp['epochs']} epochs) after {summary['trials']['total']} trials, "
              f"{summary['private_train_trials']} on private data -> {report}")
    return summary
