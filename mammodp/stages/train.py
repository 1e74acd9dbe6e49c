"""Stage `train`: one (regime, epsilon) cell of the grid, over the seeds.

Regimes:
- `real`: real CBIS training patches only (DP-SGD unless epsilon = inf).
- `real+synth`: real patches (private) plus synthetic ones mixed into every step at
  `train.synth_ratio`; synthetic records are public here and never enter the accountant.
- `synth`: synthetic patches only (`train.pretrain_epochs`); no real training record is
  touched, so the training spends no budget (the generator's own epsilon, if any, is what
  covers it). It does not depend on the budget: ONE cell (`models/classifier/synth`, DVC
  stage `train_synth`), reported at every budget.
- `synth-pretrain+dp-finetune`: (DP-)fine-tuning on real patches of the `synth` model of the
  same seed: that model is the shared synthetic pretraining, trained once for all budgets.

Each seed is one MLflow run under the grid's parent run, tagged as DESIGN.md says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from mammodp.config import SYNTH_CELL, Config, flatten, format_epsilon
from mammodp.data.datasets import PatchTable, read_manifest_table
from mammodp.data.manifest import manifest_path
from mammodp.errors import ConfigError, DataError
from mammodp.checkpoint import Checkpoint, exclusive_output
from mammodp.io import atomic_dir, write_json

log = logging.getLogger(__name__)

REGIMES = ("real", "real+synth", "synth", "synth-pretrain+dp-finetune")
SYNTH_REGIMES = ("real+synth", "synth", "synth-pretrain+dp-finetune")

PRIVACY_NOTE = (
    "epsilon covers the real CBIS training patches used by DP-SGD (privacy unit as tagged), "
    "accounted over Poisson sampling at the recorded sample rate, steps and noise. It does not "
    "cover: the per-epoch train_loss diagnostic (computed without noise); the validation split read every epoch for model selection; hyper-parameters chosen "
    "by tuning on private data; the synthetic data's generator unless it was trained with DP."
)


def cbis_manifest(cfg: Config) -> Path:
    return manifest_path(cfg.data.prepared_dir, "cbis")


def synthetic_manifest(cfg: Config) -> Path:
    return manifest_path(cfg.data.synthetic_dir)


def synthetic_provenance(df: pd.DataFrame) -> dict:
    """What the synthetic set's manifest says about its generator's privacy."""
    eps = str(df["generator_epsilon"].iloc[0]) if "generator_epsilon" in df.columns else "unknown"
    run_id = str(df["generator_run_id"].iloc[0]) if "generator_run_id" in df.columns else "unknown"
    covered = eps not in ("non-private", "unknown", "inf", "nan")
    return {
        "generator_epsilon": eps,
        "generator_run_id": run_id,
        "synthetic_privacy": f"dp(eps={eps})" if covered else "not_covered",
    }


# train.* keys each regime reads (dvc.yaml lists exactly these for its stage; MLflow logs them).
_COMMON_KEYS = ("epochs", "lr", "weight_decay", "batch_size", "physical_batch_size", "label_smoothing", "flip",
                "amp", "seeds", "device")
REGIME_TRAIN_KEYS = {
    "real": _COMMON_KEYS,
    "real+synth": _COMMON_KEYS + ("synth_ratio",),
    "synth": tuple(k if k != "epochs" else "pretrain_epochs" for k in _COMMON_KEYS),
    "synth-pretrain+dp-finetune": _COMMON_KEYS,  # + the synth model's own keys, through its weights
}


def cell_name(regime: str, epsilon: float) -> str:
    """`real-1`, `real+synth-inf`, ... and `synth` (one cell for every budget)."""
    return SYNTH_CELL if regime == "synth" else f"{regime}-{format_epsilon(epsilon)}"


def synth_model_dir(synth_model: Path, seed: int) -> Path:
    """The saved `synth` model of one seed (the synthetic pretraining that is fine-tuned)."""
    d = Path(synth_model) / f"seed={seed}"
    if not (d / "meta.json").is_file():
        raise DataError("the synth model of this seed is missing (the shared synthetic pretraining); "
                        "run `mammodp train --regime synth` (DVC stage train_synth) first", path=d)
    return d


def fit_spec(cfg: Config, epsilon: float, seed: int, tuned: dict | None = None, regime: str = "real"):
    """The FitSpec of one run from params (and tuned values from `--tuned`).

    Only `real+synth` mixes synthetic samples into the steps, so only it reads
    `train.synth_ratio`.
    """
    from mammodp.training import FitSpec

    t, dp = cfg.train, cfg.dp
    spec = FitSpec(
        epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay, batch_size=t.batch_size,
        physical_batch_size=t.physical_batch_size, label_smoothing=t.label_smoothing,
        flip=t.flip, amp=t.amp, seed=seed, epsilon=epsilon, delta=dp.delta,
        max_grad_norm=dp.max_grad_norm, accountant=dp.accountant, privacy_unit=dp.privacy_unit,
        grad_chunk=dp.grad_chunk, per_sample_method=dp.per_sample_method, reproducible_noise=dp.reproducible_noise,
        synth_ratio=t.synth_ratio if regime == "real+synth" else 0.0,
    )
    if regime == "synth":  # synthetic only: no DP, its own epoch count
        spec = replace(spec, epsilon=math.inf, epochs=t.pretrain_epochs)
    if tuned:
        spec = replace(spec, **{k: v for k, v in tuned.items() if k in ("lr", "max_grad_norm", "noise_multiplier", "epochs")})
    return spec


def load_tuned(path: Path | None) -> dict | None:
    """Best params of a finished Optuna study (`reports/tune/eps=E.json`), or None.

    Tuned values are opted into per command (`mammodp train --tuned FILE`), never read
    behind DVC's back: a DVC stage that should use them lists the file as a dep.
    """
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise DataError("tuning result not found; run `mammodp tune` first", path=p)
    try:
        best = json.loads(p.read_text()).get("best_params")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"not a tuning report ({exc})", path=p) from exc
    if not best:
        raise DataError("the study has no complete trial: no best params to train with", path=p)
    # The study's privacy cost travels with its params (fit_spec takes only the numeric keys),
    # so that the run and its registered version state it.
    statement = json.loads(p.read_text()).get("privacy_statement")
    return {**best, "privacy_statement": str(statement)} if statement else best


# Settings that define a grid's recipe; a grid's cells (budgets, regimes, seeds) and where it
# runs (device, workers) are not part of it, so adding a budget keeps the same parent run.
_NOT_RECIPE = ("synthetic_regimes", "epsilons", "seeds", "device", "num_workers")


def grid_parent_run(cfg: Config) -> str:
    """Find or create the parent run that groups the grid's runs (keyed by the grid's params)."""
    import hashlib

    import mlflow

    from mammodp import tracking

    train = {k: v for k, v in asdict(cfg.train).items() if k not in _NOT_RECIPE}
    grid = {"plan": cfg.plan, "model": asdict(cfg.model), "train": train, "dp": asdict(cfg.dp)}
    key = hashlib.sha256(json.dumps(grid, sort_keys=True, default=str).encode()).hexdigest()[:12]
    runs = tracking.find_runs(cfg.experiment, f"tags.stage = 'train-grid' and tags.grid_id = '{key}'")
    if len(runs):
        return str(runs.iloc[0]["run_id"])
    with tracking.start_run(cfg.experiment, "train-grid", name=f"train/grid/{key}",
                            tags={"grid_id": key, "plan": cfg.plan},
                            params=flatten(grid),
                            description="Parent of the classifier grid: regimes x budgets x seeds.") as run:
        return run.info.run_id


def cell_metrics(summary: dict) -> dict[str, float]:
    """The numbers of a grid cell for `dvc metrics show`: one row per cell, same columns.

    Non-finite values are left out (a non-private cell has no epsilon: `private` is 0).
    """
    runs = summary["runs"]
    out: dict[str, float] = {
        "val_auprc": summary["val_auprc_mean"],
        "val_auprc_std": float(np.std([r["val_auprc"] for r in runs])) if len(runs) > 1 else 0.0,
        "private": int(math.isfinite(summary["epsilon_target"])),
        "epsilon_target": summary["epsilon_target"],
        "epsilon": summary["epsilon_spent_max"],
        "within_budget": int(all(r["within_budget"] for r in runs)),
        "noise_multiplier": float(np.mean([r["noise_multiplier"] or 0.0 for r in runs])),
        "sample_rate": float(np.mean([r["sample_rate"] for r in runs])),
        "steps": int(max(r["steps"] for r in runs)),
        "best_epoch": float(np.mean([r["best_epoch"] for r in runs])),
        "n_seeds": len(runs),
    }
    return {k: v for k, v in out.items() if isinstance(v, int) or math.isfinite(v)}


def run(cfg: Config, regime: str, epsilon: float | None, seeds=None, resume: bool = False, device: str | None = None,
        out: Path | None = None, metrics_out: Path | None = None, report_out: Path | None = None,
        tuned_path: Path | None = None, resume_if_valid: bool = False,
        synth_model: Path = Path("models/classifier/synth")) -> dict:
    """Train one grid cell for every seed.

    Writes `out/seed=S/` models, a numbers-only metrics JSON (`metrics_out`, for
    `dvc metrics show`) and the full record with its privacy statement (`report_out`).

    Under `torchrun --nproc_per_node=N` every rank runs this alike, training data-parallel
    (`mammodp.privacy.distributed`); only rank 0 logs to MLflow and writes outputs.
    Checkpoints live in `out/.checkpoints/` (locked: one trainer per `out`). `resume` continues
    from them and refuses ones made with other settings; `resume_if_valid` (the pipeline's
    choice) continues from a checkpoint of identical settings and otherwise trains afresh.

    `synth` takes no budget (`epsilon` None or inf): it is one cell for every budget.
    `synth-pretrain+dp-finetune` fine-tunes `synth_model/seed=S` (the `synth` cell's output).
    """
    from mammodp.privacy import distributed
    from mammodp.runtime import claim_gpu, resolve_device

    if (gpu := claim_gpu()) is not None:  # one GPU per concurrent job of a DVC queue ($MAMMODP_GPU_POOL)
        log.info("job holds GPU %s of $MAMMODP_GPU_POOL", gpu)

    if regime not in REGIMES:
        raise ConfigError(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}", field="regime")
    if regime == "synth":
        if epsilon is not None and math.isfinite(epsilon):
            raise ConfigError("the synth regime touches no private record and spends no budget: it is trained "
                              "once, without --epsilon, and reported at every budget", field="epsilon")
        epsilon = math.inf
    elif epsilon is None:
        raise ConfigError(f"regime {regime} needs a target budget (--epsilon, inf = non-private)", field="epsilon")
    name = cell_name(regime, epsilon)
    out = Path(out or Path("models/classifier") / name)
    metrics_out = Path(metrics_out or Path("metrics/train") / f"{name}.json")
    report_out = Path(report_out or Path("reports/train") / f"{name}.json")
    dist = distributed.setup(device or cfg.train.device)  # None outside torchrun
    try:
        return _run_cell(cfg, regime, epsilon, seeds, resume, dist.device if dist else resolve_device(device or cfg.train.device),
                         out, metrics_out, report_out, tuned_path, dist, resume_if_valid, synth_model)
    finally:
        if dist is not None:
            distributed.shutdown()


def _run_cell(cfg, regime, epsilon, seeds, resume, dev, out, metrics_out, report_out, tuned_path, dist,
              resume_if_valid: bool = False, synth_model: Path = Path("models/classifier/synth")) -> dict:
    main = dist is None or dist.is_main
    eps_txt = format_epsilon(epsilon)
    seeds = list(seeds or cfg.train.seeds)

    manifest = cbis_manifest(cfg)
    real_df = read_manifest_table(manifest)
    val = PatchTable.from_frame(real_df[real_df["split"] == "val"])
    real = None if regime == "synth" else PatchTable.from_frame(real_df[real_df["split"] == "train"])
    synth, provenance = None, {"synthetic_privacy": "none"}
    if regime in SYNTH_REGIMES:
        sm = synthetic_manifest(cfg)
        sdf = read_manifest_table(sm)
        synth = PatchTable.from_frame(sdf)
        provenance = synthetic_provenance(sdf)
        if synth.images.shape[-2:] != val.images.shape[-2:]:
            raise DataError(f"synthetic patches are {synth.images.shape[-2:]} but real ones "
                            f"{val.images.shape[-2:]}; regenerate the synthetic set", path=sm)
    tuned = load_tuned(tuned_path)
    if regime == "synth-pretrain+dp-finetune":  # fail before any training if a seed's pretraining is missing
        inits = {seed: synth_model_dir(synth_model, seed) for seed in seeds}
    else:
        inits = {}

    results = []
    parent = grid_parent_run(cfg) if main else None
    # Checkpoints live in the live `out` (replaced whole, with them, when the cell is done); the
    # lock refuses a second trainer on `out` and lets stale temp outputs of a kill -9 be removed.
    # Ranks other than 0 (torchrun) write nothing and hold no lock: their folders are scratch.
    resume_mode = "restart" if resume_if_valid and not resume else "refuse"
    resume = resume or resume_if_valid
    with (exclusive_output(out, metrics_out, report_out) if main else _scratch_dir()) as ckpt_root, \
            (atomic_dir(out) if main else _scratch_dir()) as tmp_out:
        for seed in seeds:
            results.append(_train_seed(cfg, regime, epsilon, seed, real, synth, val, provenance, tuned,
                                       dev, tmp_out / f"seed={seed}", ckpt_root / f"seed={seed}",
                                       resume, parent, manifest, resume_mode, main=main, init=inits.get(seed)))
    if not main:
        return {"regime": regime, "epsilon_target": epsilon, "runs": results, "rank": dist.rank}
    summary = {
        "regime": regime, "epsilon_target": epsilon, "delta": cfg.dp.delta,
        "privacy_unit": cfg.dp.privacy_unit, "runs": results,
        "val_auprc_mean": float(np.nanmean([r["val_auprc"] for r in results])),
        "epsilon_spent_max": max(r["epsilon"] for r in results),
        "privacy_note": PRIVACY_NOTE, **provenance,
        **({"budget_independent": True} if regime == "synth" else {}),
    }
    write_json(report_out, summary)
    write_json(metrics_out, cell_metrics(summary))
    print(f"train {regime} {'(every budget)' if regime == 'synth' else 'eps=' + eps_txt}: val AUPRC {summary['val_auprc_mean']:.3f}, "
          f"epsilon spent {format_epsilon(summary['epsilon_spent_max']) if math.isinf(summary['epsilon_spent_max']) else round(summary['epsilon_spent_max'], 3)} "
          f"(target {eps_txt}) -> {out}")
    return summary


@contextlib.contextmanager
def _scratch_dir():
    with tempfile.TemporaryDirectory(prefix="mammodp-rank-") as tmp:
        yield Path(tmp)


def _train_seed(cfg, regime, epsilon, seed, real, synth, val, provenance, tuned, dev, model_dir, ckpt_dir,
                resume, parent, manifest, resume_mode="refuse", main: bool = True, init: Path | None = None) -> dict:
    import mlflow

    from mammodp import tracking
    from mammodp.metrics.classification import choose_threshold, classification_metrics
    from mammodp.models.swin import create_classifier
    from mammodp.pyfunc_model import log_classifier
    from mammodp.runtime import seed_everything
    from mammodp.inference import save_classifier
    from mammodp.training import fit

    seed_everything(seed)
    spec = fit_spec(cfg, epsilon, seed, tuned, regime)
    model = create_classifier(cfg.model.preset, pretrained_weights=cfg.model.pretrained_weights, mode=cfg.model.mode)
    init_meta = _load_init(model, init, cfg) if init is not None else None
    if init_meta is not None and str(init_meta.get("generator_run_id")) != str(provenance.get("generator_run_id")):
        raise DataError(f"the synth model was trained on the synthetic set of generator run "
                        f"{init_meta.get('generator_run_id')}, but data/synthetic now comes from "
                        f"{provenance.get('generator_run_id')}; retrain it (DVC stage train_synth)", path=init)
    eps_txt = format_epsilon(epsilon)
    private_touched_without_dp = math.isinf(epsilon) and real is not None
    tags = {
        "regime": regime, "epsilon": eps_txt, "delta": cfg.dp.delta, "seed": seed,
        "privacy_unit": cfg.dp.privacy_unit, "model_selection": "validation split (touched every epoch)",
        "private_data_without_dp": str(private_touched_without_dp or provenance["synthetic_privacy"] == "not_covered").lower(),
        "manifest_hash": tracking.manifest_hash(manifest), **provenance,
    }
    if regime == "synth":
        tags["budget_independent"] = "true"  # one model for every budget (promotion may use it at any it fits)
    if init_meta is not None:
        tags["init_run_id"] = init_meta["run_id"]  # lineage: the synth model (shared synthetic pretraining)
        tags["init_model"] = str(init)
    desc = f"{regime} at target epsilon {eps_txt}, seed {seed}. {PRIVACY_NOTE}"
    if provenance["synthetic_privacy"] == "not_covered":
        desc += (" The synthetic data came from a generator trained on private data WITHOUT DP: "
                 "this run's epsilon does not cover the synthetic pathway (synthetic_privacy=not_covered).")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # A checkpoint stands for every setting of this run (all params but the grid's own lists,
    # whose cell this is) and the exact data: resuming with anything else is refused.
    grid_lists = ("train.epsilons", "train.seeds", "train.synthetic_regimes")
    run_settings = {"params": {k: v for k, v in flatten(cfg).items() if k not in grid_lists},
                    "cell": {"regime": regime, "epsilon": epsilon, "seed": seed, "tuned": tuned or {}},
                    "data": {"cbis_manifest": tags["manifest_hash"], **{k: provenance[k] for k in sorted(provenance)},
                             **({"synthetic_n": len(synth)} if synth is not None else {}),
                             **({"init": {"run_id": init_meta["run_id"], "weights_sha256": init_meta["weights_sha256"]}}
                                if init_meta is not None else {})}}

    def ckpt(name):
        return Checkpoint(ckpt_dir / name, {**run_settings, "phase": name}, on_mismatch=resume_mode)

    if _world_size() > 1:
        tags["world_size"] = _world_size()  # data-parallel ranks (torchrun)
    if os.environ.get("MAMMODP_GPU_POOL"):
        tags["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # the queue job's GPU
    with contextlib.nullcontext() if not main else tracking.start_run(
                            cfg.experiment, "train", name=tracking.run_name("train", regime, epsilon, seed),
                            tags=tags, parent_run_id=parent, description=desc,
                            params={**flatten(cfg.model, "model"),
                                    **{f"train.{k}": v for k, v in flatten(cfg.train).items()
                                       if k in REGIME_TRAIN_KEYS[regime]},
                                    **flatten(cfg.dp, "dp"), "tuned_params": json.dumps({k: v for k, v in (tuned or {}).items()
                                                               if k != "privacy_statement"})}) as run:

        # Lineage: the manifest rows this run read (the UI's Dataset column).
        if real is not None and main:
            tracking.log_dataset(real.frame, manifest, "cbis-train", "training")
        if main:
            tracking.log_dataset(val.frame, manifest, "cbis-val", "validation")
        if synth is not None and main:
            tracking.log_dataset(synth.frame, synthetic_manifest(cfg), "synthetic", "training")

        def on_epoch(rec, offset=0):
            if main:
                tracking.log_metrics({k: rec[k] for k in ("epsilon", "train_loss", "val_auprc")}, step=rec["epoch"] + offset)

        if regime == "synth-pretrain+dp-finetune":  # the synth model (loaded above) is the pretraining
            res = fit(model, spec, private=real, public=None, val=val, device=dev,
                      checkpoint=ckpt("last.pt"), resume=resume, on_epoch=on_epoch, desc=f"finetune seed={seed}")
        elif regime == "synth":
            res = fit(model, spec, private=None, public=synth, val=val, device=dev,
                      checkpoint=ckpt("last.pt"), resume=resume, on_epoch=on_epoch, desc=f"synth seed={seed}")
        elif regime == "real+synth":
            res = fit(model, spec, private=real, public=synth, val=val, device=dev,
                      checkpoint=ckpt("last.pt"), resume=resume, on_epoch=on_epoch, desc=f"real+synth seed={seed}")
        else:
            res = fit(model, spec, private=real, public=None, val=val, device=dev,
                      checkpoint=ckpt("last.pt"), resume=resume, on_epoch=on_epoch, desc=f"real seed={seed}")

        if not main:  # a helper rank: its replica equals rank 0's, which reports it
            return {"seed": seed, "epsilon": float(res.privacy["epsilon"]), "steps": res.privacy["steps"]}
        model.load_state_dict(res.best_state)
        privacy = dict(res.privacy)
        spent = float(privacy["epsilon"])
        e2e = end_to_end_privacy(cfg, regime, epsilon, privacy)  # this run composed with its generator
        thr = choose_threshold(val.labels, res.val_probs, method=cfg.evaluate.threshold, fixed=cfg.evaluate.fixed_threshold)
        val_metrics = classification_metrics(val.labels, res.val_probs, threshold=thr)
        within = e2e.within(epsilon)  # the end-to-end total, not the classifier's part alone
        meta = {
            "preset": cfg.model.preset, "mode": cfg.model.mode, "patch_size": cfg.prepare.patch_size,
            "margin": cfg.prepare.margin, "min_size": cfg.prepare.min_size,
            "regime": regime, "seed": seed, "epsilon_target": epsilon, "epsilon": spent,
            "delta": cfg.dp.delta, "threshold": thr, "best_epoch": res.best_epoch, "run_id": run.info.run_id,
            "privacy": privacy, "privacy_note": PRIVACY_NOTE, **provenance, **end_to_end_meta(e2e),
            "serve": asdict(cfg.serve),  # the served model's request limits (mammodp.serving)
            **({"budget_independent": True} if regime == "synth" else {}),
            **({"init_run_id": init_meta["run_id"]} if init_meta is not None else {}),
        }
        save_classifier(model, meta, model_dir)
        mlflow.log_params({
            "noise_multiplier": privacy.get("noise_multiplier", 0.0), "sample_rate": privacy.get("sample_rate"),
            "steps": privacy.get("steps", 0), "delta": cfg.dp.delta, "max_grad_norm": spec.max_grad_norm,
            "accountant": privacy.get("accountant", "none"), "privacy_unit": cfg.dp.privacy_unit,
            "accountant_fallback": privacy.get("accountant_fallback", False), "threshold": thr,
        })
        mlflow.set_tag("within_budget", str(within).lower())
        log_end_to_end(e2e, tuning_statement(tuned))
        tracking.log_metrics({f"final_val_{k}": v for k, v in val_metrics.items() if isinstance(v, (int, float))})
        tracking.log_metrics({"best_val_auprc": res.best_val_auprc, "best_epoch": res.best_epoch})
        if math.isfinite(spent):
            mlflow.log_metric("epsilon", spent, step=len(res.history))
        mlflow.log_dict(meta, "privacy/meta.json")
        mlflow.log_text(what_epsilon_covers(e2e, tuning_statement(tuned)), "privacy/what_epsilon_covers.txt")
        log_classifier(model_dir, val.images[0, 0])
        if not within:  # the end-to-end total, which may differ from the classifier's own `spent`
            log.warning("run %s is not within its budget epsilon %s end to end (the classifier's own DP-SGD "
                        "spent %.3f): %s", run.info.run_id, eps_txt, spent, e2e.statement())
        return {"seed": seed, "run_id": run.info.run_id, "val_auprc": res.best_val_auprc,
                "epsilon": spent, "epsilon_total": e2e.text, "within_budget": within, "best_epoch": res.best_epoch,
                "threshold": thr, "model_dir": str(Path(model_dir).name), **{k: privacy.get(k) for k in
                ("noise_multiplier", "sample_rate", "steps", "accountant", "accountant_fallback")}}


def _load_init(model, init: Path, cfg: Config) -> dict:
    """Load the synth model of `init` (a `save_classifier` folder) into `model`; its meta plus
    the weights' sha256 (a checkpoint of the fine-tune names the exact pretraining it started from)."""
    import hashlib

    import torch

    from mammodp.inference import MODEL_META, MODEL_WEIGHTS

    meta = json.loads((Path(init) / MODEL_META).read_text())
    for key, want in (("preset", cfg.model.preset), ("mode", cfg.model.mode), ("patch_size", cfg.prepare.patch_size)):
        if meta.get(key) != want:
            raise DataError(f"the synth model was trained with {key}={meta.get(key)!r}, this run uses {want!r}; "
                            "retrain it (DVC stage train_synth)", path=init)
    weights = Path(init) / MODEL_WEIGHTS
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return {**meta, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


# --------------------------------------------------------------------------- end-to-end privacy
# Kept together (and out of the loop above) on purpose: what one run's guarantee is, end to end.

# Artefacts that reveal private data without DP, declared in every run (README: "Declared releases").
DECLARED_RELEASES = (
    "the validation split (read every epoch for model selection and the operating threshold)",
    "the per-epoch train_loss diagnostic (mean loss over the Poisson batch, without noise)",
    "hyper-parameters tuned on private data (mammodp tune; the tuning statement below)",
    "synth-quality: the closest synthetic/training pairs grid (real training patches; "
    "synth_quality.show_real_pairs), nearest-neighbour distances, FID/FRD against real patches",
    "a non-private GAN's diagnostics (losses and D(real) over real batches, history.csv) and its "
    "mode-collapse warning tags (real-data diversity)",
    "mammodp audit: membership-inference figures and the non-private power model",
)


def generator_privacy_record(cfg: Config) -> dict | None:
    """The synthetic set's generator privacy record (`generator_privacy.json`), if any."""
    p = Path(cfg.data.synthetic_dir) / "generator_privacy.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable generator privacy record: {exc}", path=p) from exc


def end_to_end_privacy(cfg: Config, regime: str, epsilon: float, privacy: dict):
    """The run's end-to-end guarantee: its DP-SGD composed with its generator's (if any)."""
    from mammodp.privacy.compose import end_to_end

    synthetic_used = regime in SYNTH_REGIMES
    real_used = regime != "synth"
    private = real_used and math.isfinite(epsilon) and bool(privacy.get("private"))
    return end_to_end(privacy if private else None, delta=cfg.dp.delta, privacy_unit=cfg.dp.privacy_unit,
                      accountant=cfg.dp.accountant, real_without_dp=real_used and not private,
                      generator=generator_privacy_record(cfg) if synthetic_used else None,
                      synthetic_used=synthetic_used)


def end_to_end_meta(e2e) -> dict:
    """What the saved model carries (served as its `epsilon`)."""
    return {"epsilon_total": e2e.text if e2e.epsilon_total is None else e2e.epsilon_total,
            "epsilon_total_method": e2e.method, "epsilon_total_status": e2e.status,
            "epsilon_total_statement": e2e.statement()}


def tuning_statement(tuned: dict | None) -> str:
    """The tuning study's privacy statement when this run trained with its params (`--tuned`), else ''."""
    return str((tuned or {}).get("privacy_statement", ""))


def log_end_to_end(e2e, tuning: str) -> None:
    """Tags `epsilon_total`, `epsilon_total_method`, `epsilon_total_status` (+ `tuning_statement`)
    and the metric `epsilon_total` when finite, on the active run."""
    import mlflow

    from mammodp import tracking

    tags = {"epsilon_total": e2e.text, "epsilon_total_method": e2e.method, "epsilon_total_status": e2e.status}
    if e2e.fallback:
        tags["epsilon_total_fallback"] = e2e.fallback
    if tuning:
        tags["tuning_statement"] = tuning
    mlflow.set_tags(tags)
    if e2e.epsilon_total is not None:
        tracking.log_metrics({"epsilon_total": e2e.epsilon_total})


def what_epsilon_covers(e2e, tuning: str) -> str:
    """`privacy/what_epsilon_covers.txt`: the run's epsilon, its end-to-end total, and every
    release of private data without DP."""
    lines = [PRIVACY_NOTE, "", "End to end: " + e2e.statement()]
    if tuning:
        lines += ["", "Tuning: " + tuning]
    lines += ["", "Released without DP (declared; not covered by any epsilon):"]
    lines += [f"- {r}" for r in DECLARED_RELEASES]
    return "\n".join(lines) + "\n"


def _world_size() -> int:
    from mammodp.privacy.distributed import active

    ctx = active()
    return ctx.world_size if ctx is not None else 1
