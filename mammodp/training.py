"""The classifier training loop: one recipe for private and non-private training.

Reads top to bottom: build the optimiser, (make it private), then per epoch take steps,
score the validation set, keep the best-by-validation weights, checkpoint. Nothing here
touches MLflow, DVC or params.yaml: stages pass plain values and a per-epoch callback.

Privacy accounting (when `spec.epsilon` is finite):
- only `private` records (real patients' patches) are sampled with Poisson sampling and
  counted by the accountant; `public` records (synthetic patches) are mixed into each step
  without clipping or noise and never enter the accountant;
- model selection reads the validation split each epoch: that is recorded by the stage.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mammodp.checkpoint import Checkpoint, as_checkpoint
from mammodp.data.datasets import PatchTable, random_flips

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSpec:
    """Everything one training run needs, as plain values."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int  # logical batch: expected number of private records per step
    physical_batch_size: int  # most samples through the model at once
    label_smoothing: float
    flip: bool
    amp: bool
    seed: int
    epsilon: float  # target budget; inf = non-private
    delta: float
    max_grad_norm: float
    accountant: str
    privacy_unit: str  # patch | patient
    grad_chunk: int
    per_sample_method: str = "auto"  # auto | hooks | vmap (see mammodp.privacy)
    noise_multiplier: float | None = None  # fixed sigma (tuning); None = calibrate to epsilon
    reproducible_noise: bool = False
    synth_ratio: float = 0.0  # public samples per expected private record in each step

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)


@dataclass
class FitResult:
    """What a run produced: the validation-selected weights and the privacy record."""

    best_state: dict
    best_epoch: int
    best_val_auprc: float
    history: list[dict]
    privacy: dict
    val_probs: np.ndarray
    selection: str = "best validation AUPRC (validation split only)"
    extra: dict = field(default_factory=dict)


EpochCallback = Callable[[dict], None]


def _loss_fn(spec: FitSpec):
    import torch

    return torch.nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)


def _score(model, table: PatchTable, device) -> tuple[np.ndarray, float]:
    """P(malignant) on a table and its AUPRC (NaN with one class)."""
    from mammodp.metrics.classification import classification_metrics
    from mammodp.inference import predict_proba

    probs = predict_proba(model, table.images, device=str(device))
    return probs, float(classification_metrics(table.labels, probs)["auprc"])


def fit(
    model,
    spec: FitSpec,
    *,
    private: PatchTable | None,
    public: PatchTable | None,
    val: PatchTable,
    device,
    checkpoint: Checkpoint | Path | None = None,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train `model` in place and return the best-by-validation state.

    Args:
        model: classifier from `mammodp.models.swin.create_classifier`.
        spec: the run's settings.
        private: real training patches (records are sampled with Poisson sampling when
            private); None for synthetic-only training.
        public: synthetic patches mixed into each step (never counted as private records).
        val: validation patches: the only data used for model selection.
        device: torch device.
        checkpoint: the per-epoch checkpoint (model, optimiser, accountant, RNGs): a
            `mammodp.checkpoint.Checkpoint` (file + the settings it must match) or a bare path.
        resume: continue from `checkpoint` if it exists and was made with the same settings.
        on_epoch: called after every epoch with that epoch's record.
        progress: show a progress bar per epoch.
        desc: progress-bar label.
    """
    import torch
    from tqdm.auto import tqdm

    from mammodp.privacy.engine import make_private

    if private is None and public is None:
        raise ValueError("nothing to train on: give private and/or public data")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    loss_fn = _loss_fn(spec)
    gen = torch.Generator().manual_seed(spec.seed)  # shuffling, flips, public draws
    use_amp = spec.amp and torch.device(device).type == "cuda"

    dp_engine = None
    if spec.private and private is not None:
        records = private.record_ids(spec.privacy_unit)
        n_records = int(records.max()) + 1
        dp_engine = make_private(
            model,
            optimizer,
            record_ids=records,
            expected_batch_size=spec.batch_size,
            target_epsilon=spec.epsilon,
            delta=spec.delta,
            epochs=spec.epochs,
            max_grad_norm=spec.max_grad_norm,
            accountant=spec.accountant,
            privacy_unit=spec.privacy_unit,
            noise_multiplier=spec.noise_multiplier,
            # Subsampling amplification assumes the Poisson draws are secret: seed them (and
            # the noise) from params only when reproducibility was asked for. Their state is
            # still checkpointed, so a resumed run draws exactly what it would have drawn.
            noise_seed=spec.seed if spec.reproducible_noise else None,
            sampler_seed=spec.seed if spec.reproducible_noise else None,
            grad_chunk=spec.grad_chunk,
            physical_batch_size=spec.physical_batch_size,
            autocast_dtype=torch.bfloat16 if use_amp else None,
            per_sample_method=spec.per_sample_method,
        )
        log.info("DP-SGD: %d records, q=%.4g, sigma=%.4g, %d steps",
                 n_records, dp_engine.sample_rate, dp_engine.noise_multiplier, dp_engine.total_steps)

    start_epoch, history = 0, []
    best = {"state": copy.deepcopy(model.state_dict()), "epoch": -1, "auprc": -math.inf, "probs": None}
    checkpoint = as_checkpoint(checkpoint)  # plain data, settings-checked (mammodp.checkpoint)
    ck = checkpoint.load(spec) if resume and checkpoint is not None else None
    if ck is not None:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        if dp_engine is not None:
            dp_engine.load_state_dict(ck["dp"])
        start_epoch, history, best = ck["epoch"] + 1, ck["history"], ck["best"]
        log.info("resumed from %s at epoch %d", checkpoint.path, start_epoch)

    x_priv = y_priv = x_pub = y_pub = None
    if private is not None:
        x_priv, y_priv = private.tensors()
    if public is not None:
        x_pub, y_pub = public.tensors()

    def augment(x):
        return random_flips(x, gen) if spec.flip else x

    for epoch in range(start_epoch, spec.epochs):
        model.train()
        losses = []
        if dp_engine is not None:
            steps = dp_engine.steps_per_epoch
            bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{spec.epochs}", disable=not progress, leave=False)
            for step in bar:
                idx = dp_engine.sample_batch()  # Poisson: patch indices of the sampled records
                xb, yb = augment(x_priv[idx]), y_priv[idx]
                pub = None
                if x_pub is not None and spec.synth_ratio > 0:
                    m = max(1, round(spec.synth_ratio * spec.batch_size))
                    j = torch.randint(0, len(x_pub), (m,), generator=gen)
                    pub = (augment(x_pub[j]).to(device), y_pub[j].to(device))
                loss = dp_engine.step(xb.to(device), yb.to(device), loss_fn, record_idx=idx, public=pub)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss)
                if progress and step == steps - 1:  # accounting is costly: once per epoch
                    bar.set_postfix(loss=f"{loss:.3f}", eps=f"{dp_engine.epsilon_spent():.2f}")
        else:
            # Non-private: shuffled minibatches over private + public (mixed at synth_ratio).
            xs, ys = [], []
            if x_priv is not None:
                xs.append(x_priv)
                ys.append(y_priv)
            if x_pub is not None:
                if x_priv is not None and spec.synth_ratio > 0:
                    m = min(len(x_pub), max(1, round(spec.synth_ratio * len(x_priv))))
                    j = torch.randperm(len(x_pub), generator=gen)[:m]
                    xs.append(x_pub[j])
                    ys.append(y_pub[j])
                elif x_priv is None:
                    xs.append(x_pub)
                    ys.append(y_pub)
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            order = torch.randperm(len(x_all), generator=gen)
            batches = [order[i : i + spec.batch_size] for i in range(0, len(order), spec.batch_size)]
            bar = tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{spec.epochs}", disable=not progress, leave=False)
            for bidx in bar:
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for chunk in bidx.split(spec.physical_batch_size):
                    xb, yb = augment(x_all[chunk]).to(device), y_all[chunk].to(device)
                    with torch.autocast(device_type="cuda", enabled=use_amp):
                        loss = loss_fn(model(xb), yb) * (len(chunk) / len(bidx))
                    loss.backward()
                    total += loss.item()
                optimizer.step()
                losses.append(total)
                bar.set_postfix(loss=f"{total:.3f}")

        val_probs, val_auprc = _score(model, val, device)
        record = {
            "epoch": epoch,
            # Empty Poisson batches give NaN losses. Under DP this loss is NOT privatised: it is
            # a diagnostic outside epsilon (the stage says so in the run).
            "train_loss": float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan"),
            "val_auprc": val_auprc,
            "epsilon": dp_engine.epsilon_spent() if dp_engine is not None else (math.inf if private is not None else 0.0),
        }
        history.append(record)
        if np.isfinite(val_auprc) and val_auprc > best["auprc"]:
            best = {"state": copy.deepcopy(model.state_dict()), "epoch": epoch, "auprc": val_auprc, "probs": val_probs}
        if checkpoint is not None:
            checkpoint.save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(), "dp": dp_engine.state_dict() if dp_engine else None,
                "epoch": epoch, "history": history, "best": best,
            }, spec)
        if on_epoch is not None:
            on_epoch(record)

    if best["probs"] is None:  # every epoch had NaN AUPRC (one-class val): keep the last weights
        best = {"state": copy.deepcopy(model.state_dict()), "epoch": spec.epochs - 1,
                "auprc": float("nan"), "probs": _score(model, val, device)[0]}
    privacy = dp_engine.summary() if dp_engine is not None else {
        "epsilon": math.inf if private is not None else 0.0,
        "noise_multiplier": 0.0, "sample_rate": float("nan"), "steps": 0,
        "accountant": "none", "accountant_fallback": False,
    }
    return FitResult(best_state=best["state"], best_epoch=best["epoch"], best_val_auprc=best["auprc"],
                     history=history, privacy=privacy, val_probs=best["probs"])
