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
from mammodp.data.datasets import PatchTable, apply_flips, flip_masks, random_flips
from mammodp.runtime import to_device

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
    warmup_epochs: int = 0  # linear learning-rate warm-up from lr / steps to lr
    cosine: bool = False  # cosine decay of the learning rate to 0 after the warm-up

    def lr_at(self, step: int, total: int, per_epoch: int) -> float:
        """The learning rate of (0-based) optimiser step `step` of `total` (a function of the
        step count alone, so a resumed run continues the same schedule)."""
        warm = self.warmup_epochs * per_epoch
        if step < warm:
            return self.lr * (step + 1) / warm
        if not self.cosine or total <= warm:
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))

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
    val_probs: np.ndarray | None  # None when trained without a validation set
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


def _engine(model, optimizer, spec: FitSpec, private: PatchTable | None, public: PatchTable | None, device):
    """The one DP engine of a run: private (finite epsilon) or its non-private mode."""
    import torch

    from mammodp.privacy.engine import make_private

    use_amp = spec.amp and torch.device(device).type == "cuda"
    if private is not None:
        records, unit, target = private.record_ids(spec.privacy_unit), spec.privacy_unit, spec.epsilon
        sigma = spec.noise_multiplier if spec.private else None
    else:  # synthetic only: public samples are the records of a non-private engine
        records, unit, target, sigma = public.record_ids("patch"), "patch", math.inf, None
    batch = spec.batch_size
    if not (private is not None and spec.private):  # non-private: a small set is one batch
        batch = min(batch, int(np.unique(records).size))
    engine = make_private(
        model, optimizer, record_ids=records, expected_batch_size=batch,
        target_epsilon=target, delta=spec.delta, epochs=spec.epochs, max_grad_norm=spec.max_grad_norm,
        accountant=spec.accountant, privacy_unit=unit, noise_multiplier=sigma,
        # Subsampling amplification assumes the Poisson draws are secret: seed them (and
        # the noise) from params only when reproducibility was asked for. Their state is
        # still checkpointed, so a resumed run draws exactly what it would have drawn.
        noise_seed=spec.seed if spec.reproducible_noise else None,
        sampler_seed=spec.seed if (spec.reproducible_noise or not spec.private or private is None) else None,
        grad_chunk=spec.grad_chunk, physical_batch_size=spec.physical_batch_size,
        autocast_dtype=torch.bfloat16 if use_amp else None, per_sample_method=spec.per_sample_method,
    )
    log.info("%s: %d records, q=%.4g, sigma=%.4g, %d steps", "DP-SGD" if engine.private else "non-private",
             engine.sampler.n_records, engine.sample_rate, engine.noise_multiplier, engine.total_steps)
    return engine


def _epsilon(engine, private: PatchTable | None) -> float:
    """Epsilon spent on private records: 0 when none were trained on, inf without DP."""
    return engine.epsilon_spent() if private is not None else 0.0


def privacy_record(engine, private: PatchTable | None) -> dict[str, Any]:
    """The one privacy-record schema of every run: the engine's summary, plus whether the
    run's sampled records were private (synthetic-only training spends no epsilon)."""
    rec = dict(engine.summary())
    rec["trained_on_private"] = private is not None
    rec["epsilon"] = _epsilon(engine, private)
    return rec


class FrozenFeatures:
    """A frozen backbone's features of a table, computed once for every flip state.

    With `model.mode == "frozen_backbone"` every step would otherwise push each sampled patch
    through the backbone again. The backbone is fixed (eval mode, no trainable parameter) and
    per sample (LayerNorm, no batch statistics), so a patch's features under each of the four
    (horizontal, vertical) flip states are computed once here and a step takes its rows: the
    same numbers the per-step forward gives, at (4 x records) forward passes per run instead
    of (epochs x records).
    """

    def __init__(self, features_fn, images, device, autocast_dtype=None, flips: bool = True, batch: int = 256):
        import torch

        x = torch.as_tensor(images, dtype=torch.float32)
        states = [(False, False), (True, False), (False, True), (True, True)] if flips else [(False, False)]
        banks = []
        ctx = (torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype is not None
               else _nullcontext())
        with torch.inference_mode(), ctx:
            for h, v in states:
                rows = []
                for i in range(0, len(x), batch):
                    xb = x[i:i + batch]
                    hb = torch.full((len(xb),), h, dtype=torch.bool)
                    vb = torch.full((len(xb),), v, dtype=torch.bool)
                    rows.append(features_fn(apply_flips(xb, hb, vb).to(device)).float())
                banks.append(torch.cat(rows) if rows else torch.zeros(0))
        self.bank = torch.stack(banks).clone()  # (states, N, F), out of inference mode

    def take(self, idx, h=None, v=None):
        """Feature rows of samples `idx`, each under its own flip state (None: unflipped)."""
        # Host indices moved without blocking: a blocking copy would make the host wait for
        # the device's queued work every step.
        idx = to_device(idx, self.bank.device)
        if h is None:
            return self.bank[0, idx]
        state = h.long() + 2 * v.long()
        return self.bank[to_device(state, self.bank.device), idx]


def _head_on_features(head):
    """The trainable head as the engine's model: features (B, F) in, logits out. Its
    parameters are the classifier's own (same objects, same `head.` names)."""
    import torch

    class HeadOnFeatures(torch.nn.Module):
        dp_sample_major = True  # one row per sample: every hook-based route applies

        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, f):
            return self.head(f)

    return HeadOnFeatures()


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def fit(
    model,
    spec: FitSpec,
    *,
    private: PatchTable | None,
    public: PatchTable | None,
    val: PatchTable | None,
    device,
    checkpoint: Checkpoint | Path | None = None,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    desc: str = "train",
    optimizer_factory: Callable[[list], Any] | None = None,
    dist=None,
    cache_features: bool = True,
) -> FitResult:
    """Train `model` in place and return the best-by-validation state.

    Args:
        model: classifier from `mammodp.models.swin.create_classifier`.
        spec: the run's settings.
        private: real training patches (records are sampled with Poisson sampling when
            private); None for synthetic-only training.
        public: synthetic patches mixed into each step (never counted as private records).
        val: validation patches: the only data used for model selection. None: no
            selection and no per-epoch scoring; the result holds the final weights (what an
            audit attacks).
        device: torch device.
        checkpoint: the per-epoch checkpoint (model, optimiser, accountant, RNGs): a
            `mammodp.checkpoint.Checkpoint` (file + the settings it must match) or a bare path.
        resume: continue from `checkpoint` if it exists and was made with the same settings.
        on_epoch: called after every epoch with that epoch's record.
        progress: show a progress bar per epoch.
        desc: progress-bar label.
        optimizer_factory: builds the optimiser from the trainable parameters; default
            AdamW(lr, weight_decay) from `spec`. Its update is post-processing of the
            (private) gradient, so any optimiser keeps the guarantee.
        dist: a `mammodp.privacy.distributed.DistContext` to train data-parallel (records
            sharded over the ranks, clipped sums all-reduced, noise once); default: the one
            `distributed.setup()` joined in this process (torchrun), else single-process.
            Every rank calls `fit` alike; only rank 0 writes the checkpoint.
        cache_features: with a frozen backbone (`model.dp_split()`), compute its features
            once per flip state (`FrozenFeatures`) and train the head on them; False pushes
            every step's patches through the backbone (the reference the cache is tested
            against: same draws, same updates).
    """
    import torch
    from tqdm.auto import tqdm

    if private is None and public is None:
        raise ValueError("nothing to train on: give private and/or public data")
    if dist is None:
        from mammodp.privacy.distributed import active

        dist = active()
    progress = progress and (dist is None or dist.is_main)
    if torch.device(device).type == "cpu":
        # Steps allocate and free the same tensors: glibc keeps the memory instead of
        # handing it back and faulting it in again every step (DP steps 1.25-1.3x -> 1.15-1.2x
        # plain on CPU in bench/dp_overhead.py; plain steps ~10% faster too).
        from mammodp.runtime import keep_freed_memory

        keep_freed_memory()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (optimizer_factory(params) if optimizer_factory is not None
                 else torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay))
    loss_fn = _loss_fn(spec)
    gen = torch.Generator().manual_seed(spec.seed)  # flips and public draws
    split = model.dp_split() if cache_features and callable(getattr(model, "dp_split", None)) else None
    # Frozen backbone: the engine trains the head on features computed once (FrozenFeatures).
    dp_engine = _engine(_head_on_features(split[1]) if split is not None else model, optimizer, spec, private,
                        public, device)
    # Flips are drawn for every sample each step, so every rank draws the same: one stream for
    # flips and public draws, equal on all ranks (and to the 1-process run's).
    aug_gen = gen
    if dist is not None:
        dist.make_data_parallel(dp_engine, spec.seed)
    # The table the engine samples from: real records, or (synthetic-only training) the
    # public set itself, sampled the same way so that every regime has one loop shape.
    sampled = private if private is not None else public
    mixed = public if private is not None else None

    start_epoch, history = 0, []
    best = {"state": copy.deepcopy(model.state_dict()), "epoch": -1, "auprc": -math.inf, "probs": None}
    checkpoint = as_checkpoint(checkpoint)  # plain data, settings-checked (mammodp.checkpoint)
    ck = None
    if resume and checkpoint is not None and (dist is None or dist.is_main):
        ck = checkpoint.load(spec)
    if dist is not None and resume and checkpoint is not None:
        ck = dist.broadcast_object(ck)  # rank 0's file: no shared file system needed
    if ck is not None:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        dp_engine.load_state_dict(ck["dp"])
        start_epoch, history, best = ck["epoch"] + 1, ck["history"], ck["best"]
        if dist is not None:
            dist.load_rank_state(ck.get("ranks"), dp_engine, aug_gen)
        log.info("resumed from %s at epoch %d", checkpoint.path, start_epoch)
    if dist is not None:
        dist.broadcast_module(model)  # replicas start equal; equal updates keep them so

    x_s, y_s = sampled.tensors()
    x_pub, y_pub = mixed.tensors() if mixed is not None else (None, None)
    n_pub = max(1, round(spec.synth_ratio * spec.batch_size)) if x_pub is not None and spec.synth_ratio > 0 else 0
    f_s = f_pub = f_val = None
    if split is not None:
        import torch

        amp_dtype = torch.bfloat16 if spec.amp and torch.device(device).type == "cuda" else None
        model.eval()
        f_s = FrozenFeatures(split[0], x_s, device, amp_dtype, flips=spec.flip)
        f_pub = FrozenFeatures(split[0], x_pub, device, amp_dtype, flips=spec.flip) if n_pub else None
        if val is not None:  # scored in fp32, as predict_proba
            f_val = FrozenFeatures(split[0], val.images, device, None, flips=False)

    def augment(j):
        """Public samples `j` (drawn with replacement), flipped."""
        if f_pub is not None:
            return f_pub.take(j, *(flip_masks(len(j), aug_gen) if spec.flip else (None, None)))
        return random_flips(x_pub[j], aug_gen) if spec.flip else x_pub[j]

    def augment_sampled(idx):
        # Flips are drawn for EVERY sample at every step and indexed by the batch: a record's
        # flip (and every later draw) never depends on which other records were sampled, so
        # its clipped contribution stays a function of that record alone.
        if not spec.flip:
            return f_s.take(idx) if f_s is not None else x_s[idx]
        h, v = flip_masks(len(x_s), aug_gen)
        if f_s is not None:
            return f_s.take(idx, h[idx], v[idx])
        return apply_flips(x_s[idx], h[idx], v[idx])

    def score():
        if val is None:
            return None, float("nan")
        if f_val is None:
            return _score(model, val, device)
        from mammodp.metrics.classification import classification_metrics

        model.eval()
        with torch.no_grad():
            probs = torch.softmax(split[1](f_val.take(torch.arange(len(val.images)))).float(), dim=1)[:, 1]
        probs = probs.cpu().numpy()
        return probs, float(classification_metrics(val.labels, probs)["auprc"])

    # One loop for every run: Poisson batches from the engine (private records, or the public
    # set when nothing private is trained on), synthetic samples mixed into every step, the
    # engine's precision policy. eps = inf differs from DP only in clipping, noise and accounting.
    scheduled = spec.warmup_epochs > 0 or spec.cosine
    for epoch in range(start_epoch, spec.epochs):
        model.train()
        losses = []
        steps = dp_engine.steps_per_epoch
        bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{spec.epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = dp_engine.sample_batch()  # Poisson: sample indices of the sampled records
            xb, yb = augment_sampled(idx), y_s[idx]
            pub = None
            if n_pub:
                j = torch.randint(0, len(x_pub), (n_pub,), generator=gen)  # public: with replacement
                pub = (augment(j), y_pub[j])
            loss = dp_engine.step(xb, yb, loss_fn, record_idx=idx, public=pub)
            if scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = spec.lr_at(epoch * steps + step, spec.epochs * steps, steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)  # a device tensor: read once per epoch, so no step waits for the device
            if progress and step == steps - 1:  # accounting is costly: once per epoch
                eps = dp_engine.epsilon_spent()
                bar.set_postfix(loss=f"{float(loss):.3f}", eps="inf" if math.isinf(eps) else f"{eps:.2f}")
        losses = torch.stack(losses).cpu().numpy() if losses else np.zeros(0)

        val_probs, val_auprc = score()
        record = {
            "epoch": epoch,
            # Empty Poisson batches give NaN losses. Under DP this loss is NOT privatised: it is
            # a diagnostic outside epsilon (the stage says so in the run).
            "train_loss": float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan"),
            "val_auprc": val_auprc,
            "epsilon": _epsilon(dp_engine, private),
        }
        history.append(record)
        if np.isfinite(val_auprc) and val_auprc > best["auprc"]:
            best = {"state": copy.deepcopy(model.state_dict()), "epoch": epoch, "auprc": val_auprc, "probs": val_probs}
        if checkpoint is not None:
            ranks = dist.gather_rank_state(dp_engine, aug_gen) if dist is not None else None
            if dist is None or dist.is_main:
                checkpoint.save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(), "dp": dp_engine.state_dict(),
                    "epoch": epoch, "history": history, "best": best,
                    **({"ranks": ranks} if ranks is not None else {}),
                }, spec)
        if on_epoch is not None:
            on_epoch(record)

    if best["probs"] is None:  # no validation set, or NaN AUPRC every epoch (one-class val): the last weights
        best = {"state": copy.deepcopy(model.state_dict()), "epoch": spec.epochs - 1,
                "auprc": float("nan"), "probs": score()[0]}
    privacy = privacy_record(dp_engine, private)
    return FitResult(best_state=best["state"], best_epoch=best["epoch"], best_val_auprc=best["auprc"],
                     history=history, privacy=privacy, val_probs=best["probs"],
                     **({} if val is not None else {"selection": "final weights (no validation set)"}))
