"""Per-sample and per-record gradients, and their clipping: the core of DP-SGD.

Two routes compute the same numbers (tests check both against a loop of ordinary
autograd):
- `vmap` (here): `torch.func` `vmap(grad(loss of one sample))` differentiates the whole
  forward for each sample independently, whatever the layers do. The reference route.
- `hooks` (`grad_sampler`): one batched forward/backward with per-layer rules; needs a
  model that declares its folding sample-major (Swin). ~1.3x a plain step instead of ~1.9x.

Why not Opacus' own hooks: a timm Swin folds attention windows into the batch dimension
((B * windows, tokens, C) inside every block) and keeps a raw `relative_position_bias_table`
parameter, so Opacus' per-layer hooks see windows, not samples.

Only trainable parameters (`requires_grad=True`) get gradients; frozen parameters enter as
constants, so head-only DP (frozen backbone) is the same code with fewer gradients.

A *record* is the privacy unit: one patch, or all patches of one patient. A record's
gradient is the sum of its samples' gradients; clipping acts on records.

Memory: per-sample gradients cost `grad_chunk x (number of trainable parameters)` floats
(swin_tiny, full model: 28M x 32 x 4 B = 3.6 GB), plus the activations of `grad_chunk` samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

# loss_fn(logits (n, classes), targets (n,)) -> scalar MEAN loss over the n samples, e.g.
# nn.CrossEntropyLoss(label_smoothing=0.1). Per-sample losses are obtained by calling it
# on one sample at a time (n = 1) inside vmap.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Opacus' clipping factor min(1, C / (norm + 1e-6)): the epsilon keeps zero norms finite.
_NORM_EPS = 1e-6


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for the parameters that get (private) gradients."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _PerSample:
    """vmap(grad) of one sample's loss w.r.t. the trainable parameters of `model`.

    A model may offer `dp_split() -> (features_fn, head, prefix) | None`: a frozen prefix
    run once per batch outside vmap (no graph, no per-sample transform) and a trainable
    suffix module whose parameters are the model's trainable ones under `prefix`. Frozen
    backbone + private head then costs one plain forward plus per-sample head gradients.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, autocast_dtype: torch.dtype | None):
        self.autocast_dtype = autocast_dtype
        trainable = trainable_named_parameters(model)
        split = model.dp_split() if callable(getattr(model, "dp_split", None)) else None
        if split is not None:
            features, module, prefix = split
            local = dict(module.named_parameters())
            if not all(n.startswith(prefix) and n[len(prefix):] in local for n in trainable):
                split = None  # the offered suffix does not hold every trainable parameter
        if split is None:
            features, module, prefix = None, model, ""
        self.features, self.module, self.prefix = features, module, prefix
        self.full_names = list(trainable)
        frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
        buffers = dict(module.named_buffers())

        def sample_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # x: one sample (C, H, W) or feature vector (F,) inside vmap; a batch of one.
            with _autocast(x.device, autocast_dtype):
                logits = functional_call(module, (params, frozen, buffers), (x.unsqueeze(0),))
            return loss_fn(logits.float(), y.unsqueeze(0))

        # randomness="different": a stochastic layer (none in our presets) would draw per
        # sample, as in plain training, instead of raising.
        self._fn = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")

    def params(self) -> dict[str, torch.Tensor]:
        """Detached trainable tensors under the suffix module's names."""
        named = dict(self.module.named_parameters())
        return {n[len(self.prefix):]: named[n[len(self.prefix):]].detach() for n in self.full_names}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The vmapped inputs: the samples, or their frozen features (B, F)."""
        if self.features is None:
            return x
        with torch.no_grad(), _autocast(x.device, self.autocast_dtype):
            return self.features(x)

    def __call__(self, params, x, y) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample grads {full name: (n, *shape)} and losses (n,) for prepared inputs."""
        grads, losses = self._fn(params, x, y)
        return {self.prefix + n: g for n, g in grads.items()}, losses


METHODS = ("auto", "vmap", "hooks")


def resolve_method(model: nn.Module, method: str) -> str:
    """`auto` -> `hooks` when the model supports them, else `vmap`.

    Raises:
        ValueError: unknown method, or `hooks` for a model they do not support.
    """
    from mammodp.privacy import grad_sampler

    if method not in METHODS:
        raise ValueError(f"unknown per-sample gradient method {method!r}; known: {', '.join(METHODS)}")
    if method == "vmap":
        return "vmap"
    ok = grad_sampler.supports(model)
    if method == "hooks" and not ok:
        raise ValueError("the hook-based per-sample gradients do not support this model; use 'vmap'")
    return "hooks" if ok else "vmap"


def _make_fn(model: nn.Module, loss_fn: LossFn, autocast_dtype: torch.dtype | None, method: str):
    if resolve_method(model, method) == "hooks":
        from mammodp.privacy.grad_sampler import HookPerSample

        return HookPerSample(model, loss_fn, autocast_dtype)
    return _PerSample(model, loss_fn, autocast_dtype)


def _group_records(record_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort samples by record.

    Returns:
        keys (R,): the distinct record ids, ascending; order (B,): sample positions grouped
        by record (stable); counts (R,): samples per record.
    """
    keys, inverse, counts = torch.unique(record_ids, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    return keys, order, counts


def _packs(counts: list[int], max_samples: int) -> list[tuple[int, int]]:
    """Greedy runs of consecutive records holding at most `max_samples` samples each.

    A record larger than `max_samples` forms a run alone (its samples are then processed
    in several vmap calls and summed before clipping). Returns [start, stop) record ranges.
    """
    runs, start, size = [], 0, 0
    for i, c in enumerate(counts):
        if size and size + c > max_samples:
            runs.append((start, i))
            start, size = i, 0
        size += c
    if counts:
        runs.append((start, len(counts)))
    return runs


def _record_grads(
    fn, trainable: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, local: torch.Tensor | None,
    n_records: int, grad_chunk: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-record gradient sums for one pack of whole records.

    Args:
        x, y: the pack's samples (n, ...), grouped by record.
        local: (n,) record index 0..n_records-1 of each sample, or None when every sample is
            its own record (n == n_records, no summing needed).

    Returns:
        grads {name: (n_records, *shape)} and the per-sample losses (n,).
    """
    if local is None and x.shape[0] <= grad_chunk:
        return fn(trainable, x, y)
    out: dict[str, torch.Tensor] = {}
    losses = []
    for s in range(0, x.shape[0], grad_chunk):
        g, loss = fn(trainable, x[s : s + grad_chunk], y[s : s + grad_chunk])
        losses.append(loss)
        idx = None if local is None else local[s : s + grad_chunk]
        for name, v in g.items():
            if idx is None:
                out.setdefault(name, []).append(v)  # type: ignore[attr-defined]
            else:
                if name not in out:
                    out[name] = v.new_zeros((n_records, *v.shape[1:]))
                out[name].index_add_(0, idx, v)  # (n_records, *shape) += per-sample (k, *shape)
    if local is None:
        out = {k: torch.cat(v) for k, v in out.items()}  # type: ignore[arg-type]
    return out, torch.cat(losses)


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    record_ids: torch.Tensor | None = None,
    grad_chunk: int = 32,
    autocast_dtype: torch.dtype | None = None,
    method: str = "vmap",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient of each record's summed loss, for every trainable parameter (unclipped).

    Materialises all records' gradients at once: meant for tests and small batches; the
    training path uses `clipped_grad_sum`, which keeps only `grad_chunk` at a time.

    Args:
        model: any module; its train/eval mode is used as is.
        loss_fn: mean loss over a batch (see `LossFn`).
        inputs: (B, ...) samples; targets: (B,).
        record_ids: (B,) integer record of each sample (privacy unit `patient`: the
            patient's index); None = every sample is its own record.
        grad_chunk: samples per vmap call.
        autocast_dtype: e.g. torch.bfloat16 to run the forward under autocast.
        method: `vmap` (torch.func, any model: the reference), `hooks` (one batched
            backward, `grad_sampler`; Swin-type models only) or `auto` (hooks if supported).

    Returns:
        ({name: (R, *param.shape)}, keys (R,)): gradients in ascending record-id order and
        those record ids (0..B-1 when `record_ids` is None).
    """
    fn = _make_fn(model, loss_fn, autocast_dtype, method)
    trainable = fn.params()
    inputs = fn.prepare(inputs)
    if record_ids is None:
        grads, _ = _record_grads(fn, trainable, inputs, targets, None, inputs.shape[0], grad_chunk)
        return grads, torch.arange(inputs.shape[0], device=inputs.device)
    record_ids = record_ids.to(inputs.device)
    keys, order, counts = _group_records(record_ids)
    local = torch.repeat_interleave(torch.arange(len(keys), device=inputs.device), counts)
    grads, _ = _record_grads(fn, trainable, inputs[order], targets[order], local, len(keys), grad_chunk)
    return grads, keys


def record_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each record's gradient over all parameters: (R,) from {name: (R, *shape)}."""
    per_param = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1).float(), dim=1) for g in grads.values()]
    return torch.linalg.vector_norm(torch.stack(per_param, dim=1), dim=1)


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / (norm + 1e-6)) per record (Opacus' flat clipping); 1 when C is infinite."""
    return (max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0)


@dataclass
class ClippedSum:
    """Sum over records of clipped gradients for one batch.

    Attributes:
        grads: {name: param-shaped tensor}: sum_r min(1, C / |g_r|) g_r.
        norms: (R,) unclipped per-record gradient norms (for logging clipping rates).
        n_records: R; n_samples: samples behind them.
        loss_sum: sum of per-sample losses (detached float).
    """

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    n_records: int
    n_samples: int
    loss_sum: float


def clipped_grad_sum(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    max_grad_norm: float,
    record_ids: torch.Tensor | None = None,
    grad_chunk: int = 32,
    autocast_dtype: torch.dtype | None = None,
    method: str = "vmap",
) -> ClippedSum:
    """Per-record clipped gradients, summed, with at most ~`grad_chunk` records in memory.

    Records are processed in packs of whole records (at most `grad_chunk` samples per
    pack, unless one record alone is larger): each pack's per-record gradients are
    computed, clipped to norm `max_grad_norm` over ALL trainable parameters, and added
    to the running sum. The inputs must contain every sample of each record present.

    Args: as `per_sample_gradients`, plus `max_grad_norm` (C; `math.inf` = no clipping).
        With `method="hooks"` one pack is one batched forward/backward (memory: the pack's
        activations plus its per-sample gradients).

    Returns:
        The clipped sum, per-record norms and counts.
    """
    params = trainable_named_parameters(model)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n = inputs.shape[0]
    if n == 0:
        return ClippedSum(total, torch.zeros(0, device=inputs.device), 0, 0, 0.0)
    fn = _make_fn(model, loss_fn, autocast_dtype, method)
    trainable = fn.params()
    inputs = fn.prepare(inputs)  # samples, or frozen features computed once for the batch
    if record_ids is None:
        # Patch unit: each sample is a record; packs are plain slices.
        packs = [(torch.arange(s, min(s + grad_chunk, n), device=inputs.device), None, min(grad_chunk, n - s))
                 for s in range(0, n, grad_chunk)]
    else:
        keys, order, counts = _group_records(record_ids.to(inputs.device))
        counts_l = counts.tolist()
        offsets = [0]
        for c in counts_l:
            offsets.append(offsets[-1] + c)
        packs = []
        for a, b in _packs(counts_l, grad_chunk):
            pos = order[offsets[a] : offsets[b]]
            if b - a == offsets[b] - offsets[a]:
                local = None  # one sample per record in this pack: nothing to sum
            else:
                local = torch.repeat_interleave(torch.arange(b - a, device=inputs.device), counts[a:b])
            packs.append((pos, local, b - a))
    norms_all, loss_sum = [], torch.zeros((), device=inputs.device)
    for pos, local, n_rec in packs:
        grads, losses = _record_grads(fn, trainable, inputs[pos], targets[pos], local, n_rec, grad_chunk)
        norms = record_norms(grads)  # (n_rec,)
        factors = clip_factors(norms, max_grad_norm)
        for name, g in grads.items():
            # sum_r factor_r * g_r as one matmul: (n_rec,) @ (n_rec, P) -> (P,)
            total[name] += (factors @ g.reshape(n_rec, -1).float()).view_as(total[name])
        norms_all.append(norms.detach())
        loss_sum += losses.detach().sum()  # stays on the device: no sync per pack
    norms_cat = torch.cat(norms_all)
    return ClippedSum(total, norms_cat, int(norms_cat.numel()), n, float(loss_sum))


__all__ = [
    "METHODS",
    "LossFn",
    "resolve_method",
    "ClippedSum",
    "clip_factors",
    "clipped_grad_sum",
    "per_sample_gradients",
    "record_norms",
    "trainable_named_parameters",
]
