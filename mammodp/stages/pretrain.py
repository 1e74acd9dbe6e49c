"""Stage `pretrain`: train the Swin on a PUBLIC in-domain set, without DP, once.

The paper's utility comes from ImageNet pretraining followed by DP fine-tuning. The demo has
no ImageNet, but it has a public mammography stand-in: a second phantom (`mammodp phantom
--public`: another seed, patients numbered in their own range). This stage trains the
classifier on it (non-private: no private record is read) and writes its weights, which
every regime then starts from through `model.pretrained_weights` exactly as it would start
from ImageNet weights. The budgets' fine-tunes depend on these weights; changing a budget
never reruns this stage.

Before training, the public set is checked to share no patient with any private or test
split (the prepared CBIS and BCDR manifests): a public set must be public.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path


from mammodp.config import Config
from mammodp.data.datasets import PatchTable, read_manifest_table
from mammodp.data.manifest import check_public_disjoint, manifest_path, private_manifests
from mammodp.errors import DataError
from mammodp.io import atomic_dir, write_json

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.pt"


def fit_spec(cfg: Config):
    """The non-private recipe of the public pretraining (FitSpec at eps = inf)."""
    from mammodp.training import FitSpec

    pt, tr = cfg.pretrain, cfg.train
    return FitSpec(epochs=pt.epochs, lr=pt.lr, weight_decay=tr.weight_decay, batch_size=pt.batch_size,
                   physical_batch_size=tr.physical_batch_size, label_smoothing=tr.label_smoothing, flip=tr.flip,
                   amp=tr.amp, seed=cfg.seed, epsilon=math.inf, delta=cfg.dp.delta, max_grad_norm=math.inf,
                   accountant=cfg.dp.accountant, privacy_unit="patch", grad_chunk=cfg.dp.grad_chunk,
                   per_sample_method=cfg.dp.per_sample_method, warmup_epochs=pt.warmup_epochs, cosine=True)


def run(cfg: Config, data: Path = Path("data/public"), out: Path = Path("models/pretrain"),
        metrics_out: Path = Path("metrics/pretrain.json"), report_out: Path = Path("reports/pretrain.json"),
        device: str | None = None) -> dict:
    """Pretrain on the public set under `data` (`mammodp phantom --public` output) into `out`.

    Writes `out/model.pt` (the classifier's state dict: plain tensors) and `out/meta.json`,
    a numbers-only metrics JSON and a report. With `pretrain.enabled: false` it writes a
    note instead of weights (the plan then names its own `model.pretrained_weights`).

    Raises:
        DataError: the public set is missing or shares a patient with a private/test split.
    """
    import torch

    from mammodp import tracking
    from mammodp.metrics.classification import classification_metrics
    from mammodp.models.swin import create_classifier
    from mammodp.inference import predict_proba
    from mammodp.runtime import resolve_device, seed_everything
    from mammodp.training import fit

    out, pt = Path(out), cfg.pretrain
    if not pt.enabled:
        with atomic_dir(out) as tmp:
            (tmp / "DISABLED.md").write_text("pretrain.enabled is false: no public pretraining; the regimes start "
                                             "from model.pretrained_weights.\n")
        write_json(metrics_out, {"enabled": 0})
        write_json(report_out, {"enabled": False})
        print(f"pretrain: disabled (pretrain.enabled: false); {out} holds no weights")
        return {"enabled": False}

    manifest = manifest_path(Path(data) / "prepared")
    df = read_manifest_table(manifest)
    check_public_disjoint(df, manifest, private_manifests(cfg.data.prepared_dir), "pretrain.patient_offset")
    tables = {split: PatchTable.from_frame(df[df["split"] == split]) for split in ("train", "val", "test")}
    dev = resolve_device(device or cfg.train.device)
    seed_everything(cfg.seed)
    spec = fit_spec(cfg)
    model = create_classifier(cfg.model.preset, pretrained_weights=None, mode="full")
    t0 = time.perf_counter()
    with tracking.start_run(cfg.experiment, "pretrain", name="pretrain-public",
                            tags={"data": "public", "private_data_read": "false", "epsilon": "none (public data)"},
                            description="Non-private pretraining on the public set (no private record is read); "
                                        "its weights are model.pretrained_weights of every regime.",
                            params={**{f"pretrain.{k}": v for k, v in vars(pt).items()},
                                    "model.preset": cfg.model.preset}) as run:
        tracking.log_dataset(tables["train"].frame, manifest, "public-train", "training")
        tracking.log_dataset(tables["val"].frame, manifest, "public-val", "validation")
        res = fit(model, spec, private=None, public=tables["train"], val=tables["val"], device=dev,
                  desc="pretrain (public)",
                  on_epoch=lambda r: tracking.log_metrics({"train_loss": r["train_loss"], "val_auprc": r["val_auprc"]},
                                                          step=r["epoch"]))
        model.load_state_dict(res.best_state)
        seconds = time.perf_counter() - t0
        scores = {}
        for split in ("val", "test"):
            probs = predict_proba(model, tables[split].images, device=str(dev))
            m = classification_metrics(tables[split].labels, probs)
            scores[split] = {"auroc": float(m["auroc"]), "auprc": float(m["auprc"])}
        tracking.log_metrics({f"public_{s}_{k}": v for s, d in scores.items() for k, v in d.items()})
        meta = {"preset": cfg.model.preset, "patch_size": cfg.prepare.patch_size, "best_epoch": res.best_epoch,
                "public_seed": pt.seed, "patient_offset": pt.patient_offset, "run_id": run.info.run_id,
                "records": {s: len(t) for s, t in tables.items()}, "scores": scores, "seconds": round(seconds, 1),
                "privacy": "public data only: no private record read, no epsilon spent"}
        with atomic_dir(out) as tmp:
            torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp / WEIGHTS_NAME)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        import mlflow

        mlflow.log_artifacts(str(out), artifact_path="pretrain")
    metrics = {"public_val_auroc": scores["val"]["auroc"], "public_test_auroc": scores["test"]["auroc"],
               "public_test_auprc": scores["test"]["auprc"], "best_epoch": res.best_epoch,
               "train_records": len(tables["train"]), "seconds": round(seconds, 1)}
    write_json(metrics_out, metrics)
    write_json(report_out, meta)
    print(f"pretrain: public test AUROC {scores['test']['auroc']:.3f} ({len(tables['train'])} public patches, "
          f"{seconds:.0f} s) -> {out / WEIGHTS_NAME}")
    return meta
