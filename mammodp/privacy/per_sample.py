"""Per-sample and per-record gradients, and their clipping: the core of DP-SGD.

Four routes compute the same clipped sums (tests check each against a loop of ordinary
autograd); `per_sample_method` names them:
- `vmap` (here): `torch.func` `vmap(grad(loss of one sample))` differentiates the whole
  forward for each sample independently, whatever the layers do. The reference route.
- `hooks` (`grad_sampler`): one batched forward/backward with per-layer rules that
  materialise every per-sample gradient; needs a model that declares its folding
  sample-major (Swin).
- `mixed` / `ghost` (`ghost`): the same single forward/backward, but per-record norms by
  ghost norms (T x T Gram products) where cheaper than materialisation (`mixed`; `ghost`:
  every Linear), then the clipped sum by book-keeping. The default (`auto`) where the model
  supports hooks.

Why not Opacus' own hooks: a timm Swin folds attention windows into the batch dimension
((B * windows, tokens, C) inside every block) and keeps a raw `relative_position_bias_table`
parameter, so Opacus' per-layer hooks see windows, not samples.

Only trainable parameters (`requires_grad=True`) get gradients; frozen parameters enter as
constants, so head-only DP (frozen backbone) is the same code with fewer gradients.

A *record* is the privacy unit: one patch, or all patches of one patient. A record's
gradient is the sum of its samples' gradients; clipping acts on records.

Memory (vmap / hooks): per-sample gradients cost `grad_chunk x (number of trainable
parameters)` floats (swin_tiny, full model: 28M x 32 x 4 B = 3.6 GB), plus the activations
of `grad_chunk` samples. `mixed` keeps only the layers where that is cheaper than their
activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.torch_version import TorchVersion

from mammodp.runtime import to_device

# loss_fn(logits (n, classes), targets (n,)) -> scalar MEAN loss over the n samples, e.g.
# nn.CrossEntropyLoss(label_smoothing=0.1). Per-sample losses are obtained by calling it
# on one sample at a time (n = 1) inside vmap.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Opacus' clipping factor min(1, C / (norm + 1e-6)): the epsilon keeps zero norms finite.
_NORM_EPS = 1e-6


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for the parameters that get (private) gradients."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_sample_loss_fn(loss_fn: LossFn) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """logits (n, K), targets (n,) -> the (n,) losses `loss_fn` gives each sample alone.

    A plain `nn.CrossEntropyLoss` (mean reduction, no class weights) is computed directly
    with `reduction="none"` (one kernel); any other loss by calling `loss_fn` on one sample
    at a time under vmap (~2 ms per call on CPU: a tenth of a swin_micro step's DP cost).
    """
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction == "mean":
        smoothing, ignore = loss_fn.label_smoothing, loss_fn.ignore_index

        def direct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing,
                                   ignore_index=ignore)

        return direct
    return vmap(lambda lg, t: loss_fn(lg.unsqueeze(0), t.unsqueeze(0)))


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
        from mammodp.privacy.grad_sampler import frozen_features

        return frozen_features(self.features, x, _autocast(x.device, self.autocast_dtype))

    def __call__(self, params, x, y) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample grads {full name: (n, *shape)} and losses (n,) for prepared inputs."""
        grads, losses = self._fn(params, x, y)
        return {self.prefix + n: g for n, g in grads.items()}, losses


METHODS = ("auto", "vmap", "hooks", "mixed", "ghost")
# Routes that never materialise all per-sample gradients (book-keeping clipped sums).
BOOKKEEPING = ("mixed", "ghost")


def resolve_method(model: nn.Module, method: str) -> str:
    """`auto` -> `mixed` when the model supports the hook-based routes, else `vmap`.

    Raises:
        ValueError: unknown method, or a hook-based method for a model it does not support.
    """
    from mammodp.privacy import grad_sampler

    if method not in METHODS:
        raise ValueError(f"unknown per-sample gradient method {method!r}; known: {', '.join(METHODS)}")
    if method == "vmap":
        return "vmap"
    ok = grad_sampler.supports(model)
    if method != "auto" and not ok:
        raise ValueError(f"the hook-based routes ({method!r}) do not support this model; use 'vmap'")
    if not ok:
        return "vmap"
    return "mixed" if method == "auto" else method


def make_route(model: nn.Module, loss_fn: LossFn, autocast_dtype: torch.dtype | None, method: str):
    """The object that computes per-sample gradients (vmap, hooks) or clipped sums (mixed,
    ghost) for `model`. Build it once per run: it walks the model."""
    method = resolve_method(model, method)
    if method in BOOKKEEPING:
        from mammodp.privacy.ghost import MixedClipper

        return MixedClipper(model, loss_fn, autocast_dtype, route=method)
    if method == "hooks":
        from mammodp.privacy.grad_sampler import HookPerSample

        return HookPerSample(model, loss_fn, autocast_dtype)
    return _PerSample(model, loss_fn, autocast_dtype)


def _make_fn(model: nn.Module, loss_fn: LossFn, autocast_dtype: torch.dtype | None, method: str):
    """A per-sample-gradient route (book-keeping methods materialise by hooks here)."""
    method = resolve_method(model, method)
    return make_route(model, loss_fn, autocast_dtype, "hooks" if method in BOOKKEEPING else method)


def _group_records(record_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort samples by record: book-keeping on a few ints, on the host (nothing read back
    from a device).

    Returns:
        keys (R,): the distinct record ids, ascending; order (B,): sample positions grouped
        by record (stable); counts (R,): samples per record.
    """
    keys, inverse, counts = np.unique(record_ids, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    return keys, order, counts


def _index_or_slice(pos: np.ndarray, device: torch.device) -> torch.Tensor | slice:
    """Positions (host int64) as a slice when they are one ascending run (a view, no gather)."""
    if pos.size and int(pos[-1]) - int(pos[0]) == pos.size - 1 and bool((np.diff(pos) == 1).all()):
        return slice(int(pos[0]), int(pos[-1]) + 1)
    return to_device(torch.from_numpy(pos), device)


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
            `mixed` / `ghost` do not materialise per-sample gradients: here they mean `hooks`.

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
    keys, order, counts = _group_records(record_ids.cpu().numpy())
    dev = inputs.device
    local = to_device(torch.from_numpy(np.repeat(np.arange(len(keys)), counts)), dev)
    order_t = torch.from_numpy(order)  # host: moved to each tensor's own device without blocking
    x = inputs[to_device(order_t, dev)]
    y = targets[to_device(order_t, targets.device)]
    grads, _ = _record_grads(fn, trainable, x, y, local, len(keys), grad_chunk)
    return grads, to_device(torch.from_numpy(keys), dev)


def _matmul_precision_backends() -> list:
    """torch's per-backend float32 matmul settings (`fp32_precision`, torch >= 2.9), if any."""
    out = []
    for name in ("cuda", "mkldnn"):
        backend = getattr(getattr(torch.backends, name, None), "matmul", None)
        if backend is not None and hasattr(backend, "fp32_precision"):
            out.append(backend)
    return out


@contextlib.contextmanager
def exact_arithmetic(device_type: str):
    """Clipping arithmetic as exact as float32 allows, whatever the caller set: no autograd
    graph, autocast off (an enclosing `torch.autocast` would run Grams and products in bf16),
    and float32 matrix products without TF32 / bf16 shortcuts (a process-wide
    `torch.set_float32_matmul_precision("high")` or `torch.backends.cuda.matmul.fp32_precision
    = "tf32"` would round a norm and the product it bounds differently). The precision
    settings are process-wide: they are restored on exit, also on errors; two threads clipping
    at once could see each other's restore (nothing here clips from two threads). Inside it,
    products whose operands are all TF32 numbers may run on TF32 tensor cores
    (`tf32_products`: the ghost layers under autocast).
    """
    backends = _matmul_precision_backends()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if torch.amp.is_autocast_available(device_type):  # e.g. not on "meta" (bench/dp_flops.py)
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        if backends:
            saved = [b.fp32_precision for b in backends]
            if any(v != "ieee" for v in saved):
                for b in backends:
                    b.fp32_precision = "ieee"
                stack.callback(lambda: [setattr(b, "fp32_precision", v) for b, v in zip(backends, saved)])
        else:  # older torch: the one process-wide setting
            before = torch.get_float32_matmul_precision()
            if before != "highest":
                torch.set_float32_matmul_precision("highest")
                stack.callback(torch.set_float32_matmul_precision, before)
        yield


# autocast's low-precision dtypes: every value of theirs is a TF32 number (<= 11 significant bits)
LOW_PRECISION = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def tf32_products():
    """CUDA float32 matrix products on TF32 tensor cores, for operands that are TF32 numbers
    already (bf16 / fp16 values: at most 11 significant bits): TF32 then rounds no input and
    every product of two such numbers is exact in float32. The sums accumulate in float32,
    but not necessarily as IEEE float32 does: tensor cores are reported to truncate (round
    toward zero) when they add, so the result can differ from the IEEE product by float32's
    unit per addition, with a bias (`ghost.TF32_MARGIN` covers that where a norm must bound
    a product). Several times faster than IEEE float32. The caller guarantees the operands
    (`ghost._split_bf16`, autocast's activations and gradients): the ghost layers' Grams and
    book-keeping products inside `exact_arithmetic`, the hooks route's per-sample products
    in backward. Only CUDA's per-backend setting is touched (restored on exit, also on
    errors): CPU products are unchanged. While it is set, torch's legacy getters
    (`allow_tf32`, `get_float32_matmul_precision`) raise (a mix of the two APIs); nothing
    but the products themselves runs inside."""
    backend = getattr(getattr(torch.backends, "cuda", None), "matmul", None)
    if backend is None:
        yield
        return
    if hasattr(backend, "fp32_precision"):
        before = backend.fp32_precision
        backend.fp32_precision = "tf32"
        try:
            yield
        finally:
            backend.fp32_precision = before
    else:  # older torch
        before = backend.allow_tf32
        backend.allow_tf32 = True
        try:
            yield
        finally:
            backend.allow_tf32 = before


_BF16_F32_GEMMS = TorchVersion(torch.__version__) >= (2, 8)  # torch's mm / bmm `out_dtype`


def bf16_f32_gemms(device: torch.device) -> bool:
    """Whether matrix products of bf16 tensors with a float32 result (`out_dtype`, torch >=
    2.8) run on this kind of device: CUDA (and the meta device, for counting); not the CPU,
    which has no such kernel."""
    return _BF16_F32_GEMMS and device.type in ("cuda", "meta")


def bf16_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y (matrices, or batches of them) of two bf16 tensors, as float32: every product
    of two bf16 numbers (8 significant bits each) is exact in float32 and the sums add in
    float32, so this is the float32 product of the same values, up to the order and the
    rounding of its sums (tensor cores' float32 adds, as in `tf32_products`:
    `ghost.TF32_MARGIN`). Where `bf16_f32_gemms` (CUDA): one bf16 GEMM with float32
    output (accumulated in float32, as torch documents its `out_dtype` GEMMs; a `gpu` test
    checks it), at twice TF32's peak rate and without float32 copies of the operands;
    elsewhere float32 copies multiplied under `tf32_products` (the CPU: IEEE float32, the
    same values)."""
    mm = torch.bmm if x.dim() == 3 else torch.mm
    if bf16_f32_gemms(x.device):
        return mm(x, y, out_dtype=torch.float32)
    with tf32_products():
        return mm(x.float(), y.float())


def ready(out) -> None:
    """Call before the first write into a caller's clipped-sum buffers `out`: buffers whose
    memory the caller makes only when it is needed (the engine's: `DPSGD._buffers`, off the
    forward / backward memory peak) say so with a `ready()` method, which makes and zeroes it."""
    hook = getattr(out, "ready", None)
    if hook is not None:
        hook()


_NORM_CHUNK = 4096  # numbers per partial norm in `row_norms`


def row_norms(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of `v` (R, P), accurate to float32's rounding however long the rows.

    torch's CPU `vector_norm` adds a long row up in a few float32 running sums: measured
    relative errors of 4e-5 at 2.4M numbers (Swin-T's largest layer), 4e-4 at 10M, 4e-3 at
    50M, all too small -- and a norm taken too small lets a clipped record add more than C
    (the hooks route at Swin-T: 2.1e-5 over C). Here each row is normed in chunks of 4096
    numbers (views, no copy), then the chunk norms are normed: ~1e-7, at the same speed."""
    n_rows, n = v.shape
    if n <= _NORM_CHUNK:
        return torch.linalg.vector_norm(v, dim=1)
    m = n // _NORM_CHUNK
    parts = torch.linalg.vector_norm(v[:, : m * _NORM_CHUNK].reshape(n_rows, m, _NORM_CHUNK), dim=2)  # (R, m)
    if m * _NORM_CHUNK < n:
        parts = torch.cat([parts, torch.linalg.vector_norm(v[:, m * _NORM_CHUNK :], dim=1, keepdim=True)], 1)
    return torch.linalg.vector_norm(parts, dim=1)


def record_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each record's gradient over all parameters: (R,) from {name: (R, *shape)}."""
    per_param = [row_norms(g.reshape(g.shape[0], -1).float()) for g in grads.values()]
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
        loss_sum: sum of per-sample losses (a detached 0-d tensor on the inputs' device: not
            read back here, so that clipping never waits for the device).
    """

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    n_records: int
    n_samples: int
    loss_sum: torch.Tensor


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
    route=None,
    out: dict[str, torch.Tensor] | None = None,
) -> ClippedSum:
    """Per-record clipped gradients, summed, with at most ~`grad_chunk` records in memory.

    Records are processed in packs of whole records (at most `grad_chunk` samples per
    pack, unless one record alone is larger): each pack's per-record gradients (or, for
    `mixed` / `ghost`, their norms) are computed, clipped to norm `max_grad_norm` over ALL
    trainable parameters, and added to the running sum. The inputs must contain every
    sample of each record present.

    Args: as `per_sample_gradients`, plus
        max_grad_norm: C (`math.inf` = no clipping).
        method: also `mixed` / `ghost` (book-keeping clipped sums, `privacy.ghost`). With a
            hook-based method one pack is one batched forward/backward; a record larger
            than `grad_chunk` is then done by `hooks` over several passes.
        route: a `make_route(model, loss_fn, autocast_dtype, method)` object to reuse
            (the engine builds it once per run); overrides `method` / `autocast_dtype`.
        out: {name: float32 param-shaped tensor} to accumulate into in place (e.g. the
            engine's buffers); None = fresh zeros.

    Returns:
        The clipped sum (`grads` is `out` when given), per-record norms and counts.
    """
    if out is None:
        out = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in trainable_named_parameters(model).items()}
    total = out
    n = inputs.shape[0]
    if n == 0:
        return ClippedSum(total, torch.zeros(0, device=inputs.device), 0, 0, torch.zeros((), device=inputs.device))
    fn = route if route is not None else make_route(model, loss_fn, autocast_dtype, method)
    bookkeeping = hasattr(fn, "clipped_sum")
    trainable = {} if bookkeeping else fn.params()
    inputs = fn.prepare(inputs)  # samples, or frozen features computed once for the batch
    # Grouping is book-keeping on a few ints, done on the host in numpy (a record-id tensor on
    # the device is read back once): nothing here reads a value from the device.
    rid = None if record_ids is None else record_ids.cpu().numpy()
    if rid is None or rid.size == 1 or (rid.size > 1 and bool((rid[1:] > rid[:-1]).all())):
        # Each sample its own record, in ascending order (always so for the patch unit):
        # packs are plain slices.
        packs = [(slice(s, min(s + grad_chunk, n)), None, min(grad_chunk, n - s)) for s in range(0, n, grad_chunk)]
    else:
        _, order, counts = _group_records(rid)
        counts_l = counts.tolist()
        offsets = [0]
        for c in counts_l:
            offsets.append(offsets[-1] + c)
        packs = []
        for a, b in _packs(counts_l, grad_chunk):
            pos = _index_or_slice(order[offsets[a] : offsets[b]], inputs.device)
            if b - a == offsets[b] - offsets[a]:
                local = None  # one sample per record in this pack: nothing to sum
            else:  # on the host: moved where used
                local = torch.from_numpy(np.repeat(np.arange(b - a, dtype=np.int64), counts[a:b]))
            packs.append((pos, local, b - a))
    norms_all, loss_sum = [], torch.zeros((), device=inputs.device)
    for pos, local, n_rec in packs:
        x, y = inputs[pos], targets[pos]
        if bookkeeping and x.shape[0] <= grad_chunk:
            norms, losses = fn.clipped_sum(x, y, local, n_rec, max_grad_norm, total)  # local on the host
        else:
            # A book-keeping route materialises a record larger than one pass (several passes).
            ps = fn.materialiser() if bookkeeping else fn
            grads, losses = _record_grads(ps, trainable, x, y,
                                          None if local is None else to_device(local, x.device),
                                          n_rec, grad_chunk)
            with exact_arithmetic(x.device.type):
                norms = record_norms(grads)  # (n_rec,)
                factors = clip_factors(norms, max_grad_norm)
                ready(total)
                for name, g in grads.items():
                    # sum_r factor_r * g_r as one matrix-vector product, in place: (P, R) @ (R,)
                    total[name].view(-1).addmv_(g.reshape(n_rec, -1).float().t(), factors)
        norms_all.append(norms.detach())
        loss_sum += losses.detach().sum()  # stays on the device: no sync per pack
    norms_cat = torch.cat(norms_all)
    return ClippedSum(total, norms_cat, int(norms_cat.numel()), n, loss_sum)


__all__ = [
    "BOOKKEEPING",
    "METHODS",
    "LOW_PRECISION",
    "LossFn",
    "bf16_f32_gemms",
    "bf16_product",
    "resolve_method",
    "ClippedSum",
    "clip_factors",
    "clipped_grad_sum",
    "make_route",
    "per_sample_gradients",
    "per_sample_loss_fn",
    "ready",
    "record_norms",
    "row_norms",
    "tf32_products",
    "trainable_named_parameters",
]
