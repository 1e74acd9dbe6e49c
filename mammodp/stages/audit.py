"""Stage `audit`: check the privacy claims empirically (runs after `promote`).

What is audited, and how much it costs (demo: a few CPU minutes):

1. Canary models, trained by the audit itself through `mammodp.training.fit` (so through
   `make_private`, the engine every private model uses), for each budget of `audit.epsilons`
   and, as the power check, once non-privately (epsilon = inf). Each budget gets
   `audit.models` models (demo: 3) of the grid's classifier (`model.*`, `train.*` optimiser
   settings, `dp.*`), `audit.epochs` epochs each, on
   - a random half of `audit.real_records` real patches drawn from the CBIS train and test splits,
   - a random half of `audit.canaries` white-box gradient canaries (`DiracCanaryModel`),
   - a random half of `audit.canaries` black-box canaries (noise patches with random labels),
   every inclusion an independent fair coin (per privacy record). Model 0 is the canary target:
   - one-run bound (Steinke, Nasr & Jagielski 2023) from each canary kind at the run's delta,
     at significance / 2 each (so together at `audit.significance`);
   - loss and LiRA-style membership inference over its randomised real patches and black-box
     canaries, with models 1.. as the shadows (demo: 2 shadows).
2. Every grid model (`models/classifier/*/seed=*`): the loss attack, members = CBIS train
   split, non-members = CBIS test split (inference only).
3. Each promoted model (`reports/promote.json`) whose target budget was audited (inf included):
   a LiRA-style attack over the audit's real patches with that budget's audit models as
   shadows (trained with the audit's smaller recipe: a weaker attack than shadows trained
   exactly like the target).

Consistency: the stage FAILS (PrivacyError, after writing its outputs) if a canary model's
empirical lower bound exceeds its claimed epsilon: a bug in the engine or the accounting.
Power: if the non-private model's bound is not above `audit.min_power_epsilon` the audit has
no power, and the stage says so (it does not fail).

Writes `metrics/audit.json` (numbers only), `reports/audit.json` (every figure, which models
were audited, statements), `plots/audit/claim_vs_bound.png`, and one MLflow run with claim
and bound side by side. Released without DP: the attack figures and the power model, which
trains on real patches without DP (a handful of numbers).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammodp.config import Config, flatten, format_epsilon, parse_epsilon
from mammodp.data.datasets import PatchTable, read_manifest_table
from mammodp.errors import DataError, PrivacyError

log = logging.getLogger(__name__)

KINDS = ("whitebox", "blackbox")


def _fpr_key(f: float) -> str:
    """`0.1pct` for 0.001: MLflow metric names allow no `%` (nor `=`)."""
    return f"{f * 100:g}pct"


def _budget_key(b: float) -> str:
    return f"eps_{format_epsilon(b).replace('.', '_')}"


def _attack_dict(res) -> dict[str, Any]:
    return {"auroc": res.auroc, "members": res.members, "non_members": res.non_members,
            **{f"tpr_at_fpr_{_fpr_key(f)}": t for f, t in res.tpr_at_fpr.items()}}


def audit_pool(cfg: Config) -> tuple[PatchTable, PatchTable, PatchTable]:
    """(real patches an audit model may train on, CBIS train, CBIS test) from the prepared
    CBIS manifest."""
    manifest = Path(cfg.data.prepared_dir) / "cbis" / "manifest.parquet"
    df = read_manifest_table(manifest)
    train, test = (df[df["split"] == s] for s in ("train", "test"))
    if not len(train) or not len(test):
        raise DataError("the audit needs the train and test splits", path=manifest)
    both = pd.concat([train, test])
    rng = np.random.default_rng(cfg.audit.seed)
    pick = np.sort(rng.permutation(len(both))[: min(cfg.audit.real_records, len(both))])
    return PatchTable.from_frame(both.iloc[pick]), PatchTable.from_frame(train), PatchTable.from_frame(test)


def _coins(frame: pd.DataFrame, unit: str, seed: int) -> np.ndarray:
    """One fair coin per privacy record, spread to its patches (True = trains on it)."""
    from mammodp.privacy.audit import coin_flips

    if unit == "patient":
        codes, uniques = pd.factorize(frame["patient_id"].astype(str))
        return coin_flips(len(uniques), seed)[codes]
    return coin_flips(len(frame), seed)


def train_audit_model(cfg: Config, epsilon: float, k: int, real: PatchTable, device) -> dict:
    """Train audit model k at `epsilon`; return its scores, coins and privacy claim."""
    import torch

    from mammodp.models.swin import create_classifier
    from mammodp.privacy import audit as A
    from mammodp.inference import predict_proba
    from mammodp.training import FitSpec, fit

    a, t = cfg.audit, cfg.train
    size = real.images.shape[-1]
    seed = a.seed * 10_007 + k * 101 + (0 if math.isinf(epsilon) else int(round(epsilon * 1000)))
    noise_x, noise_y = A.make_canaries(a.canaries, size, a.seed + 1)  # same canaries in every model
    dirac_x = A.dirac_canary_images(a.canaries, size)
    real_in = _coins(real.frame, cfg.dp.privacy_unit, seed)
    noise_in, dirac_in = A.coin_flips(a.canaries, seed + 1), A.coin_flips(a.canaries, seed + 2)
    images = np.concatenate([real.images[real_in], noise_x[noise_in], dirac_x[dirac_in]])
    labels = np.concatenate([real.labels[real_in], noise_y[noise_in], np.ones(int(dirac_in.sum()), np.int64)])
    patients = list(real.frame["patient_id"].astype(str)[real_in])
    patients += [f"canary-noise-{i}" for i in np.flatnonzero(noise_in)]
    patients += [f"canary-dirac-{i}" for i in np.flatnonzero(dirac_in)]
    table = PatchTable(images=images.astype(np.float32), labels=labels,
                       frame=pd.DataFrame({"patient_id": patients}))
    spec = FitSpec(epochs=a.epochs, lr=t.lr, weight_decay=t.weight_decay,
                   batch_size=min(t.batch_size, len(np.unique(patients))), physical_batch_size=t.physical_batch_size,
                   label_smoothing=t.label_smoothing, flip=t.flip, amp=t.amp, seed=seed, epsilon=epsilon,
                   delta=cfg.dp.delta, max_grad_norm=cfg.dp.max_grad_norm, accountant=a.accountant,
                   privacy_unit=cfg.dp.privacy_unit, grad_chunk=cfg.dp.grad_chunk,
                   per_sample_method=cfg.dp.per_sample_method)
    torch.manual_seed(seed)
    classifier = create_classifier(cfg.model.preset, pretrained_weights=cfg.model.pretrained_weights,
                                   mode=cfg.model.mode)
    steps = a.epochs * max(1, round(len(np.unique(patients)) / spec.batch_size))
    # With Adam a coordinate moves ~lr per step: this scale keeps a canary's gradient clipped all run.
    model = A.DiracCanaryModel(classifier, a.canaries, scale=1.0 / (t.lr * steps))
    t0 = time.perf_counter()
    # No validation set: the audit attacks the final weights, so nothing is selected or scored.
    res = fit(model, spec, private=table, public=None, val=None, device=device, progress=False,
              desc=f"audit eps={format_epsilon(epsilon)} model {k}")
    log.info("audit model %d at eps=%s: %d records, %.1f s", k, format_epsilon(epsilon), len(np.unique(patients)),
             time.perf_counter() - t0)
    model.to("cpu").eval()  # the final weights: what training released
    p_real = predict_proba(model, real.images)
    p_noise = predict_proba(model, noise_x)
    claimed = float(res.privacy["epsilon"]) if math.isfinite(epsilon) else math.inf
    return {
        "k": k, "claimed": claimed, "privacy": res.privacy,
        "real_in": real_in, "noise_in": noise_in, "dirac_in": dirac_in,
        "dirac_scores": model.canary_scores(),
        "noise_loss": A.loss_scores(p_noise, noise_y), "real_loss": A.loss_scores(p_real, real.labels),
        "phi": np.concatenate([A.logit_confidence(p_real, real.labels), A.logit_confidence(p_noise, noise_y)]),
        "members": np.concatenate([real_in, noise_in]),
    }


def audit_budget(cfg: Config, epsilon: float, real: PatchTable, device) -> dict:
    """Canary target + shadows at one budget: one-run bounds and membership inference."""
    from mammodp.privacy import audit as A

    a = cfg.audit
    models = [train_audit_model(cfg, epsilon, k, real, device) for k in range(a.models)]
    target = models[0]
    bounds = {}
    for kind, scores, inc in (("whitebox", target["dirac_scores"], target["dirac_in"]),
                              ("blackbox", target["noise_loss"], target["noise_in"])):
        r = A.one_run_audit(scores, inc, significance=a.significance / len(KINDS), delta=cfg.dp.delta)
        bounds[kind] = asdict(r)
    out = {"epsilon_target": epsilon, "claimed_epsilon": target["claimed"], "bounds": bounds,
           "bound": max(b["epsilon"] for b in bounds.values()), "models": len(models), "shadows": len(models) - 1,
           "privacy": {k: v for k, v in target["privacy"].items() if isinstance(v, (int, float, str, bool))},
           "loss_attack": _attack_dict(A.attack_metrics(np.concatenate([target["real_loss"], target["noise_loss"]]),
                                                        target["members"], a.fprs))}
    if len(models) > 1:
        shadow = np.stack([m["phi"] for m in models[1:]])
        shadow_in = np.stack([m["members"] for m in models[1:]])
        out["lira"] = _attack_dict(A.attack_metrics(A.lira_scores(target["phi"], shadow, shadow_in),
                                                    target["members"], a.fprs))
    out["_shadows"] = models  # for the promoted models' LiRA (dropped before writing)
    return out


def claim_vs_bound_figure(rows: list[dict]):
    """Claimed epsilon vs the empirical lower bounds, one group of bars per audited budget."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    finite = [r["claimed_epsilon"] for r in rows if math.isfinite(r["claimed_epsilon"])]
    top = max(finite + [r["bound"] for r in rows] + [1.0]) * 1.25
    x = np.arange(len(rows))
    claimed = [r["claimed_epsilon"] if math.isfinite(r["claimed_epsilon"]) else top for r in rows]
    ax.bar(x - 0.25, claimed, 0.25, label="claimed epsilon", color="C0")
    for i, r in enumerate(rows):
        if not math.isfinite(r["claimed_epsilon"]):
            ax.text(x[i] - 0.25, top, "inf", ha="center", va="bottom", fontsize=8)
    ax.bar(x, [r["bounds"]["whitebox"]["epsilon"] for r in rows], 0.25, label="lower bound (white-box canaries)",
           color="C3")
    ax.bar(x + 0.25, [r["bounds"]["blackbox"]["epsilon"] for r in rows], 0.25,
           label="lower bound (black-box canaries)", color="C1")
    ax.set_xticks(x, [("inf (power check)" if math.isinf(r["epsilon_target"]) else format_epsilon(r["epsilon_target"]))
                      for r in rows])
    ax.set(xlabel="audited budget", ylabel="epsilon", ylim=(0, top * 1.1),
           title="Claimed epsilon vs one-run empirical lower bound")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    return fig


def run(cfg: Config, models: Path = Path("models/classifier"), promoted: Path = Path("reports/promote.json"),
        out: Path = Path("metrics/audit.json"), report: Path = Path("reports/audit.json"),
        plots: Path = Path("plots/audit"), device: str | None = None) -> dict:
    """Run the audit; write OUT (numbers), REPORT (details) and PLOTS; return the report.

    Raises:
        DataError: missing prepared data, promotion record or model folders.
        PrivacyError: an empirical lower bound exceeds its claimed epsilon.
    """
    import mlflow

    from mammodp import tracking
    from mammodp.io import atomic_dir, write_json
    from mammodp.privacy import audit as A
    from mammodp.runtime import resolve_device, seed_everything
    from mammodp.inference import load_classifier, predict_proba

    import torch

    a = cfg.audit
    seed_everything(a.seed)
    dev = resolve_device(device or cfg.train.device)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and a.cpu_threads > 0:
        torch.set_num_threads(a.cpu_threads)
    try:
        return _run(cfg, Path(models), Path(promoted), Path(out), Path(report), Path(plots), dev)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, models: Path, promoted: Path, out: Path, report: Path, plots: Path, dev) -> dict:
    """The audit behind `run`, on a resolved device."""
    import mlflow

    from mammodp import tracking
    from mammodp.io import atomic_dir, saved_classifiers, write_json
    from mammodp.privacy import audit as A
    from mammodp.inference import load_classifier, predict_proba

    a = cfg.audit
    if not Path(promoted).is_file():
        raise DataError("promotion record not found (run `mammodp promote` first)", path=promoted)
    aliases = json.loads(Path(promoted).read_text()).get("aliases", {})
    real, train, test = audit_pool(cfg)

    # 1. Canary models per audited budget, and the non-private power model.
    budgets = [float(e) for e in a.epsilons] + [math.inf]
    audited = {b: audit_budget(cfg, b, real, dev) for b in budgets}

    # 2. Loss attack on every grid model; 3. LiRA-style on promoted models at audited budgets.
    grid = saved_classifiers(models)
    if not grid:
        raise DataError("no trained classifiers to audit (run the train stages first)", path=models)
    by_run = {meta.get("run_id"): (d, meta) for d, meta in grid}
    grid_attacks: dict[str, dict] = {}
    members = np.r_[np.ones(len(train), bool), np.zeros(len(test), bool)]
    x_mi = np.concatenate([train.images, test.images])
    y_mi = np.concatenate([train.labels, test.labels])
    real_is_train = (real.frame["split"].astype(str) == "train").to_numpy()
    promoted_attacks: dict[str, dict] = {}
    for d, meta in grid:
        model, _ = load_classifier(d)
        scores = A.loss_scores(predict_proba(model, x_mi), y_mi)
        grid_attacks[f"{d.parent.name}/{d.name}"] = _attack_dict(A.attack_metrics(scores, members, a.fprs))
    for alias, rec in aliases.items():
        run_id = rec.get("run_id")
        if run_id not in by_run:
            log.warning("promoted %s (run %s) has no model folder under %s: not audited", alias, run_id, models)
            continue
        d, meta = by_run[run_id]
        entry = {"run_id": run_id, "model": f"{d.parent.name}/{d.name}", "epsilon_target": rec.get("epsilon"),
                 "epsilon_total": rec.get("epsilon_total"), "loss_attack": grid_attacks[f"{d.parent.name}/{d.name}"]}
        target_eps = parse_epsilon(str(rec.get("epsilon")))
        if target_eps in audited and len(audited[target_eps]["_shadows"]):
            shadows = audited[target_eps]["_shadows"]
            model, _ = load_classifier(d)
            phi = A.logit_confidence(predict_proba(model, real.images), real.labels)
            sh = np.stack([m["phi"][: len(real)] for m in shadows])
            sh_in = np.stack([m["real_in"] for m in shadows])
            if real_is_train.any() and not real_is_train.all():
                entry["lira"] = _attack_dict(A.attack_metrics(A.lira_scores(phi, sh, sh_in), real_is_train, a.fprs))
                entry["lira_shadows"] = len(shadows)
        promoted_attacks[alias] = entry

    # Consistency and power.
    violations = [b for b in budgets if math.isfinite(b) and audited[b]["bound"] > audited[b]["claimed_epsilon"]]
    power = audited[math.inf]["bound"]
    has_power = power > a.min_power_epsilon
    for v in audited.values():
        v.pop("_shadows")
    rows = [audited[b] for b in budgets]
    statements = [
        f"Canary models per budget: {a.models} (1 target + {a.models - 1} LiRA shadows), {a.epochs} epochs, "
        f"{a.canaries} white-box and {a.canaries} black-box canaries and {len(real)} real patches, each included "
        f"with probability 1/2; budgets {', '.join(format_epsilon(b) for b in budgets)} (inf = power check); "
        f"audit-model claims by the {a.accountant} accountant at delta {cfg.dp.delta:g}.",
        f"Loss attack on all {len(grid)} grid models (members: CBIS train, non-members: CBIS test); LiRA-style "
        f"on {sum('lira' in e for e in promoted_attacks.values())} promoted model(s) at audited budgets.",
        ("Consistent: every empirical lower bound is at most its claimed epsilon." if not violations else
         "INCONSISTENT: lower bound above the claim at budget(s) " + ", ".join(format_epsilon(b) for b in violations)
         + ": a bug in the engine or the accounting."),
        (f"Power: the non-private canary model gives a lower bound of {power:.3g} > {a.min_power_epsilon:g}."
         if has_power else
         f"NO POWER: the non-private canary model's lower bound is {power:.3g} <= {a.min_power_epsilon:g}; "
         "a bound of 0 at the private budgets says nothing (more canaries or epochs are needed)."),
        "Released without DP: these attack figures, and the power model's training on real patches.",
    ]
    full = {"budgets": {format_epsilon(b): audited[b] for b in budgets}, "promoted": promoted_attacks,
            "grid_loss_attack": grid_attacks, "consistent": not violations, "has_power": has_power,
            "power_bound": power, "statements": statements, "settings": flatten(a)}

    numbers: dict[str, float] = {"consistent": int(not violations), "has_power": int(has_power),
                                 "power_bound": power, "grid_models": len(grid),
                                 "grid_loss_auroc_max": max(g["auroc"] for g in grid_attacks.values())}
    for b in budgets:
        r, key = audited[b], _budget_key(b)
        if math.isfinite(r["claimed_epsilon"]):
            numbers[f"{key}/claimed"] = r["claimed_epsilon"]
        for kind in KINDS:
            numbers[f"{key}/bound_{kind}"] = r["bounds"][kind]["epsilon"]
        numbers[f"{key}/loss_auroc"] = r["loss_attack"]["auroc"]
        if "lira" in r:
            numbers[f"{key}/lira_auroc"] = r["lira"]["auroc"]
            for f in a.fprs:
                numbers[f"{key}/lira_tpr_at_fpr_{_fpr_key(f)}"] = r["lira"][f"tpr_at_fpr_{_fpr_key(f)}"]
    for alias, e in promoted_attacks.items():
        numbers[f"{alias}/loss_auroc"] = e["loss_attack"]["auroc"]
        numbers[f"{alias}/loss_tpr_at_fpr_{_fpr_key(max(a.fprs))}"] = e["loss_attack"][f"tpr_at_fpr_{_fpr_key(max(a.fprs))}"]
        if "lira" in e:
            numbers[f"{alias}/lira_auroc"] = e["lira"]["auroc"]

    fig = claim_vs_bound_figure(rows)
    with atomic_dir(plots) as tmp:
        fig.savefig(tmp / "claim_vs_bound.png", dpi=100)
    write_json(report, full)
    write_json(out, numbers)
    with tracking.start_run(cfg.experiment, "audit", name="audit",
                            tags={"audit_consistent": str(not violations).lower(),
                                  "audit_has_power": str(has_power).lower(), "delta": cfg.dp.delta},
                            params={f"audit.{k}": v for k, v in flatten(a).items()},
                            description=" ".join(statements)):
        tracking.log_metrics(numbers)
        tracking.log_figure(fig, "audit/claim_vs_bound.png", saved=plots / "claim_vs_bound.png")
        mlflow.log_dict(full, "audit/report.json")
        mlflow.log_table(pd.DataFrame([{"budget": format_epsilon(r["epsilon_target"]),
                                        "claimed_epsilon": format_epsilon(r["claimed_epsilon"])
                                        if math.isinf(r["claimed_epsilon"]) else r["claimed_epsilon"],
                                        "bound_whitebox": r["bounds"]["whitebox"]["epsilon"],
                                        "bound_blackbox": r["bounds"]["blackbox"]["epsilon"]} for r in rows]),
                         "audit/claim_vs_bound.json")
    for s in statements:
        print(f"audit: {s}")
    for r in rows:
        claim = r["claimed_epsilon"]
        claim_txt = format_epsilon(claim) if math.isinf(claim) else f"{claim:.3g}"
        lira = f", LiRA AUROC {r['lira']['auroc']:.3f}" if "lira" in r else ""
        print(f"audit: eps={format_epsilon(r['epsilon_target'])}: claimed {claim_txt}, lower bound "
              f"{r['bounds']['whitebox']['epsilon']:.3g} (white-box) / {r['bounds']['blackbox']['epsilon']:.3g} "
              f"(black-box); loss-attack AUROC {r['loss_attack']['auroc']:.3f}{lira}")
    if not has_power:
        log.warning("%s", statements[3])
    if violations:
        raise PrivacyError(statements[2], field="audit")
    return full
