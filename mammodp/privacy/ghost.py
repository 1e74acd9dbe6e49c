"""Clipped gradient sums without per-sample gradients: mixed ghost clipping + book-keeping.

DP-SGD needs, per record r, the norm |G_r| of its gradient over ALL trainable parameters
and then sum_r min(1, C / |G_r|) G_r. Materialising every G_r costs (records x parameters)
memory. This route (methods `mixed` and `ghost`) gets both from ONE forward and ONE
backward (`grad_sampler.Recorder`: output gradients only, no summed weight gradients):

1. Norms, per layer, the cheaper of two exact ways (Li et al. 2022; Bu et al. 2023):
   - ghost norm of a Linear layer with T tokens per record:
     |sum_t g_t a_t^T|_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s), from the T x T Gram
     matrices of a and g: cost ~T^2 (d_in + d_out), memory a and g (kept for step 2);
   - materialisation: the (d_out x d_in) record gradient, cost ~T d_in d_out, memory
     d_in d_out per record.
   `mixed` picks ghost where 2 T^2 < d_in d_out (Bu et al.'s rule; T counts all tokens of
   a record, i.e. samples per record x tokens per sample); `ghost` takes ghost for every
   Linear / patchifier. LayerNorm, biases and the window-attention bias table are small:
   always materialised with their per-sample rules (`grad_sampler`).
2. The clipped sum by book-keeping (Bu et al.'s BK): with clip factors c_r known, a ghost
   layer's sum is ONE matrix product (c . g)^T a over all tokens (the cost of a plain
   weight gradient), a materialised one is c^T G (records x parameters), both accumulated
   in place into the caller's fp32 buffers. The ghost product runs in float32 even under
   autocast (`per_sample.exact_arithmetic`: autocast off, IEEE float32 products): a clipped
   record must add at most C, which holds only if what is added is exactly what the norm
   measured. Under autocast the Grams and the product take TF32 numbers only (the layer's
   bf16 / fp16 input and output gradient; the scaled operand split into three bf16 parts
   that sum to it exactly, `_split_bf16`), so they run on TF32 tensor cores with exact
   products and float32 sums (`per_sample.tf32_products`); because tensor cores may round
   those sums toward zero, the clip factors of such a pass are taken for norms
   (1 + TF32_MARGIN) larger. `bench/dp_flops.py` counts this block at a third of a bf16
   step's GEMM work, which IEEE float32 runs ~15x slower than bf16 on an H100 / H200, TF32
   ~2x.

What guided the choice (torch.profiler, op / call counts and per-layer timings, swin_micro,
batch 32, 1 CPU thread; `bench/dp_overhead.py --profile` prints the operator tables):

- Per-sample weight products (bmm) cost about what plain training spends on weight
  gradients (~6 ms a step either way; plain's patch-embed conv backward alone is ~4-8 ms,
  which the unfold + bmm rule replaces), so materialisation is as fast as plain where
  d_in d_out is small (stages 1-2: T = 256 / 64 tokens, d <= 32: a ghost Gram there is
  10-60x dearer). Stage 3 and the head (T = 16 / 1, d = 64-256) hold most parameters:
  there ghost norms are cheaper and keep ~3x less memory than materialised per-record
  gradients, which the old hook route computed at the top of backward while every
  activation was still alive (its memory peak, 1.60x plain; now ~1.1x).
- The rest of the old route's 1.4x was not clipping arithmetic: the route was rebuilt every
  step (model walks: ~10 ms a step under cProfile), LayerNorm inputs were re-normalised
  (native_layer_norm 4.6x plain; now the forward's saved mean / rstd), per-sample losses
  went through vmap (2 ms; now `F.cross_entropy(reduction="none")`), every layer output
  was kept alive to the end of backward (+9 MiB), and ~1,400 extra small operators ran per
  step (per-parameter zeros, norms, noise draws, divisions, casts).
- What remains is mostly a constant ~10 ms a step (the same at batch 4 and 32): ~300 extra
  small operators and ~2,500 extra Python calls (hooks, per-layer rules), which a loaded
  machine inflates more than the big kernels. Hence one flat buffer for the clipped sums
  and the noise, the many small per-record gradients (biases, LayerNorm, bias tables,
  stage-1 weights) joined after backward for one norm and one product, node pre-hooks
  instead of tensor hooks, and no-op casts skipped. (All materialised gradients side by
  side in one buffer saved ops and page faults too but, allocated before backward frees the
  activations, cost +0.1x peak memory: not taken.)
- Until 2026-12-02 every step also leaked its graph and activations (a reference cycle
  through the hooks on autograd nodes, see `grad_sampler.Recorder.run`): the process heap
  grew ~30 MiB a step and every allocation touched fresh pages, which doubled the step time
  of every variant in the bench (plain included). After the fix (swin_micro, batch 32, 1
  thread) the DP step costs ~6-10 ms over a ~33 ms plain one: backward rules +2 ms over
  plain's weight gradients, post-backward clipping / book-keeping ~2.7 ms of operators,
  noise ~0.3-1 ms, forward hooks ~1 ms, and 2,000-2,800 page faults a step where the plain
  step has none (glibc trims the heap top when the step's last tensors are freed). Since
  2026-12-04 `training.fit` keeps freed memory on CPU (`runtime.keep_freed_memory`): full-model
  DP 1.25-1.37x -> 1.15-1.27x plain in six paired bench runs.
- 2026-12-04 (late): the recorder held every layer call (its input activation) to the end of
  backward, past autograd's own copy: peak memory 1.08x -> 1.02x plain once each call is
  dropped as its sink runs. Per-section timings (process time, swin_micro, batch 32, 1 thread)
  then put the DP step's ~4.5 ms over plain at: forward hooks ~1 ms (0.4 ms at batch 1),
  LayerNorm rules ~0.7 ms, bias-table rules ~0.4 ms, post-backward clipping ~1.1 ms beyond
  the book-keeping products that replace plain's weight gradients (joined small gradients
  0.26, Gram products 0.49, clipped sums of small and materialised gradients 0.3), noise
  0.25 ms (the MT19937 draw itself: uniform_ alone is 0.19 ms for 0.1M numbers). The
  per-sample products themselves cost what plain's weight gradients do (bmm vs mm on the
  same shapes: within 5%); a sink doing only them runs the step's forward + backward in
  plain's time. Also per step now: one buffer for the noisy gradient whose views stay `.grad`
  (81 views a step were ~0.2 ms), one index_add for the small clipped sums (not one add per
  parameter), the bias-table rule along its contiguous dimension. And Python's cyclic
  collector is paused during the recorded pass (`grad_sampler.Recorder.run`): the hooks'
  ~700 objects a step had triggered a collection about once a step (0.18 ms a step).
- 2026-12-05: layer calls are recorded by shadowing each layer's `forward` for the pass,
  without nn.Module hooks (forward recording ~0.5 -> ~0.2 ms a step; fixed cost at batch 1
  ~1.6 -> ~1.4 ms over plain), and the step reads no value back from the device (the loss
  stays a device tensor, the clipped count is read when asked, record grouping is host
  numpy): on CUDA the host then queues the next work while the device runs. Measured by the
  op counts of a batch-1 step (torch.profiler): ~350 more aten calls than plain's ~5,200
  (about 230 of them kernels: per-layer sums, products, LayerNorm and bias-table rules),
  the host time that a GPU step at small batches waits on. Re-measured rules at batch 32:
  LayerNorm 0.8 ms, bias tables 0.4, linear rules 3.6 (materialised products ~2.3 of it),
  post-backward 2.1 (Grams 0.5, ghost book-keeping products 0.8); bmm alone on the stage
  1-2 shapes costs what plain's mm does (1.23 vs 1.20 ms for ten shapes). The LayerNorm rule
  rewritten as bmm's with the saved (mean, rstd) (two passes instead of four) was slower on
  every shape (42 -> 44-54 us at (32, 16, 16, 16)), and a permute-reshape for the patchifier
  instead of unfold was no faster: neither kept.
- 2026-12-05 (later; no GPU lent, so guided by counts: `bench/dp_flops.py` runs a step on
  the meta device and counts GEMM work by phase and precision, bytes written and operator
  calls). Swin-T 224, batch 128 under bf16 autocast: the clipping block ran 1131 GFLOP in
  IEEE float32, a third of plain's whole (bf16) GEMM work, at 1/15 of the bf16 rate on an
  H200. Now exact TF32 products (module docstring, item 2): 2610 GFLOP of TF32, 0.3 of IEEE
  float32; bias sums no longer copy a bf16 gradient to float32 first (written bytes 61.9 ->
  59.0 GiB, plain's 37.2). The float32 CPU step is unchanged (1.16x plain). Not yet timed
  on a GPU (`bench/dp_overhead.py --amp bf16 --routes auto,auto-ieee` is the A/B).
- 2026-12-05 (last; still no GPU): the same exact products as bf16 GEMMs with float32
  output (`MixedClipper.bf16_gemm`, `per_sample.bf16_product`; torch's `out_dtype`, CUDA
  only): counted at batch 128 bf16, the clipping block's bytes written 15.4 -> 6.8 GiB (the
  float32 copies of bf16 operands gone; the step 59.0 -> 50.5 GiB, plain's 37.2) and its
  2610 GFLOP at twice TF32's peak rate. Off by default until timed and its sums' bound checked
  on a device (`bench/dp_overhead.py --amp bf16 --routes auto,auto-bf16`; the `-m gpu`
  tests); on the CPU the switch multiplies float32 copies (same values).

Records with several samples (privacy unit `patient`): a record's gradient sums its
samples', so ghost Grams run over the concatenated tokens of each record (zero-padded to
the largest record of the pack; padding rows contribute nothing to a Gram).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from mammodp.privacy.grad_sampler import (
    HookPerSample,
    LayerCall,
    Recorder,
    as_multiplied,
    bias_table_grads,
    f32,
    layer_norm_grads,
    linear_io,
)
from mammodp.privacy.per_sample import (
    LOW_PRECISION,
    LossFn,
    bf16_product,
    clip_factors,
    exact_arithmetic,
    ready,
    row_norms,
    tf32_products,
)
from mammodp.runtime import to_device

ROUTES = ("mixed", "ghost")
# A per-record gradient of at most this many numbers is joined with the others (one norm and
# one product for all of them, after one copy): a bias, a LayerNorm's parameters, a bias table
# (Swin-T's largest 4056; each kept apart costs a norm and a product: ~50 kernel launches a
# step at Swin-T). A materialised weight only up to _SMALL_WEIGHT: joining larger ones costs
# their copy (swin_micro: 1.18x -> 1.21x plain's bytes written, no faster on the CPU).
_SMALL, _SMALL_WEIGHT = 4096, 1024
# Relative margin of the clip factors of a pass whose ghost layers ran on TF32 tensor cores
# (under autocast): records are clipped to C / (1 + 2^-12), so that float32 sums rounded
# toward zero (an error of float32's unit per addition, biased: ~1e-4 relative at worst over
# Swin-T's 3072-long dot products in blocks of four) cannot lift a clipped record over C.
TF32_MARGIN = 2.0**-12


def use_ghost(tokens: int, d_in: int, d_out: int, route: str) -> bool:
    """Ghost norm (T x T Grams) rather than materialisation for a Linear with `tokens` per record."""
    if route == "ghost":
        return True
    return 2 * tokens * tokens < d_in * d_out


def ghost_sq_norms(a: torch.Tensor, g: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """|sum_t g_bt a_bt^T|_F^2 per row b: (B,) from a (B, T, d_in), g (B, T, d_out) (float32).
    `bf16`: a and g are bf16 tensors, their Grams float32 products of bf16 numbers
    (`per_sample.bf16_product`: no float32 copies on CUDA)."""
    if a.shape[1] == 1:  # one token: |g a^T| = |g| |a|
        a, g = f32(a), f32(g)
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    if bf16:
        gram_a = bf16_product(a, a.transpose(1, 2))  # (B, T, T), float32
        gram_g = bf16_product(g, g.transpose(1, 2))
    else:
        a, g = f32(a), f32(g)
        gram_a = torch.bmm(a, a.transpose(1, 2))  # (B, T, T)
        gram_g = torch.bmm(g, g.transpose(1, 2))
    return gram_a.mul_(gram_g).sum((1, 2))


def _product_operands(g: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g and a in the precision of a materialised per-record product: g's low-precision dtype
    under autocast (bf16 / fp16, as autocast ran the layer's matmul), else float32. Exact for
    DP: the record's norm is taken of that rounded product, and that product is what is added.
    (A ghost layer's book-keeping product is float32 always: its norm comes from the Grams.)"""
    if g.dtype in LOW_PRECISION:
        return g, as_multiplied(a, g)
    return f32(g), f32(a)


def _split_bf16(x: torch.Tensor, as_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three float32 tensors of bf16 values whose exact sum is `x` (float32; overwritten: it
    becomes the third); `as_bf16`: the three parts as bf16 tensors (the same values).

    Each rounding to bf16 (round to nearest) takes at least the next 8 significant bits of
    what is left, and what is left is exact in float32 (the difference of a number and its
    own rounding), so after two roundings at most 8 of x's 24 bits remain: a bf16 number.
    TF32 products of the parts are then exact (`per_sample.tf32_products`). Holds for |x|
    from 2^-110 (below, the last part falls under float32's normal range: an error under
    2^-126 a number) up to bf16's largest number, which a clip factor <= 1 times a bf16 /
    fp16 value never exceeds."""
    hi = x.to(torch.bfloat16)
    mid = x.sub_(hi).to(torch.bfloat16)  # float32 minus bf16: computed (exactly) in float32
    x.sub_(mid)
    if as_bf16:
        return hi, mid, x.to(torch.bfloat16)
    return hi.float(), mid.float(), x


class _Pack:
    """How the samples of one forward map to records: local index and position per sample."""

    def __init__(self, n: int, local: torch.Tensor | None, n_records: int, device: torch.device):
        self.n, self.local, self.n_records, self.device = n, local, n_records, device
        self.per_record = 1
        self.pos = None
        if local is not None:
            # Record book-keeping on the host (clipped_grad_sum hands `local` over from there):
            # the largest record's size sets a shape, and reading it from the device would make
            # the host wait for the device's queued work every pack.
            rec = local.cpu().numpy()
            counts = np.bincount(rec, minlength=n_records)
            self.per_record = int(counts.max())
            pos = np.arange(n) - (np.cumsum(counts) - counts)[rec]  # position inside its record
            self.local = to_device(local, device)
            self.pos = to_device(torch.from_numpy(pos), device)

    def to_records(self, v: torch.Tensor) -> torch.Tensor:
        """(n, *shape) per-sample -> (R, *shape) per-record sums."""
        if self.local is None:
            return v
        return v.new_zeros((self.n_records, *v.shape[1:])).index_add_(0, self.local, v)

    def pad_tokens(self, v: torch.Tensor) -> torch.Tensor:
        """(n, T, d) per sample -> (R, per_record * T, d): each record's tokens, zero-padded."""
        if self.local is None:
            return v
        out = v.new_zeros((self.n_records, self.per_record, *v.shape[1:]))
        out[self.local, self.pos] = v
        return out.reshape(self.n_records, -1, v.shape[-1])


class MixedClipper:
    """Per-record clipped gradient sums by mixed ghost clipping and book-keeping.

    Args:
        model: a model `grad_sampler.supports`.
        loss_fn: mean loss over a batch (see `per_sample.LossFn`).
        autocast_dtype: e.g. torch.bfloat16 for the forward under autocast; None = fp32.
        route: `mixed` (per layer the cheaper of ghost norm and materialisation) or `ghost`.

    Attribute `tf32` (default True): under autocast, run the ghost layers' Grams and
    book-keeping products as exact TF32 products (`_split_bf16`; clip factors with
    TF32_MARGIN); False: IEEE float32 products of float32 copies (the ghost layers' products
    as before 2026-12-05, though of the recorded inputs as autocast rounded them, since the
    recorder casts them: `grad_sampler._cast_input`), kept for side-by-side benchmarks
    (`bench/dp_overhead.py --amp bf16 --routes auto,auto-ieee`; the materialised layers and
    the fallback for a record larger than a pass are the same in both). Both add what the
    norm measured.

    Attribute `bf16_gemm` (default False; an A/B switch until timed on a GPU): under bf16
    autocast with `tf32`, those products run as bf16 GEMMs with float32 output instead
    (`per_sample.bf16_product`): the same exact products of bf16 numbers with float32 sums,
    on CUDA at twice TF32's peak rate and without the float32 copies of the operands (the
    scaled operand's three parts are bf16 tensors); the same clip margin. Elsewhere (CPU)
    the products fall back to float32 copies: the same values.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, autocast_dtype: torch.dtype | None,
                 route: str = "mixed"):
        if route not in ROUTES:
            raise ValueError(f"unknown clipping route {route!r}; known: {', '.join(ROUTES)}")
        self.route = route
        self.tf32 = True
        self.bf16_gemm = False
        self.recorder = Recorder(model, loss_fn, autocast_dtype)
        self.names = self.recorder.names
        self.choices: dict[str, str] = {}  # layer key -> "ghost" | "materialise" (last pass; for reports)
        self._materialiser: HookPerSample | None = None
        self._views: list = [None, None]  # per slot: (the caller's buffers, flat views of them)
        self._scatter: tuple | None = None  # (the caller's buffers, their base, positions in it)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Samples, or frozen features computed once without autograd."""
        return self.recorder.prepare(x)

    def _tf32(self, g: torch.Tensor) -> bool:
        """Whether a ghost layer with output gradient `g` takes the exact TF32 path (autocast)."""
        return self.tf32 and g.dtype in LOW_PRECISION

    def _bf16(self, g: torch.Tensor) -> bool:
        """Whether it takes them as bf16 GEMMs with float32 output (`bf16_gemm`, bf16 autocast)."""
        return self.bf16_gemm and g.dtype == torch.bfloat16 and self._tf32(g)

    def _flat_views(self, out: dict[str, torch.Tensor], names: list[str], slot: int = 0) -> list[torch.Tensor]:
        """Flat views of `out[name]`; reused while the caller passes the same tensors (the
        engine's buffers, every step). Two cache slots: small and large gradients."""
        tensors = [out[k] for k in names]
        cached = self._views[slot]
        if cached is None or len(cached[0]) != len(tensors) or any(a is not b for a, b in zip(cached[0], tensors)):
            self._views[slot] = cached = (tensors, [t.view(-1) for t in tensors])
        return cached[1]

    def _scatter_add(self, out: dict[str, torch.Tensor], names: list[str], values: torch.Tensor) -> None:
        """out[names[0]] += values[:n0], out[names[1]] += the next n1, ... in place. Where the
        caller's buffers are views of one flat tensor (the engine's, every step), ONE index_add
        into it at cached positions; else one add per buffer."""
        tensors = [out[k] for k in names]
        cached = self._scatter
        if cached is None or len(cached[0]) != len(tensors) or any(a is not b for a, b in zip(cached[0], tensors)):
            base = tensors[0]._base if tensors else None
            ok = (base is not None and base.dim() == 1 and base.is_contiguous()
                  and all(t._base is base and t.is_contiguous() and t.dtype == values.dtype for t in tensors))
            pos = None
            if ok:
                start = base.storage_offset()
                offsets = [t.storage_offset() - start for t in tensors]
                pos = to_device(torch.cat([torch.arange(o, o + t.numel()) for o, t in zip(offsets, tensors)]),
                                base.device)
            self._scatter = cached = (tensors, base if ok else None, pos)
        _, base, pos = cached
        if base is not None:
            base.index_add_(0, pos, values)
        else:
            torch._foreach_add_(self._flat_views(out, names), list(values.split([t.numel() for t in tensors])))

    def materialiser(self) -> HookPerSample:
        """The `hooks` route on the same recorder: for a record too large for one pass."""
        if self._materialiser is None:
            self._materialiser = HookPerSample(self.recorder.model, None, None, recorder=self.recorder)
        return self._materialiser

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor, local: torch.Tensor | None, n_records: int,
                    max_grad_norm: float, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Add sum_r min(1, C / |G_r|) G_r into `out` for one pack of whole records.

        Args:
            x, y: the pack's prepared samples (n, ...) and targets, grouped by record.
            local: (n,) record index 0..n_records-1 of each sample (int64, on the host), or None
                (one sample each).
            max_grad_norm: C (`math.inf`: no clipping).
            out: {name: float32 param-shaped tensor}, accumulated in place.

        Returns:
            Unclipped per-record norms (R,) and per-sample losses (n,).
        """
        n = x.shape[0]
        pack = _Pack(n, local, n_records, x.device)
        # Materialised per-record gradients (R, P), flattened, each made as backward reaches its
        # layer (when the activations after it are freed: one buffer for all of them allocated
        # up front would sit on top of the activation peak, +0.1x memory at swin_micro).
        mats: dict[str, torch.Tensor] = {}  # weights: their norms (R,) are taken while hot
        norms_of: dict[str, torch.Tensor] = {}
        small: dict[str, torch.Tensor] = {}  # few numbers a record (biases, LayerNorm, ...): joined
        ghosts: dict[str, list] = {}  # weight name -> [(a, g) per call], tokens per sample

        def keep(name: str, v: torch.Tensor, limit: int = _SMALL) -> None:
            if v.dim() != 2:
                v = v.reshape(n_records, -1)
            store = small if v.shape[1] <= limit else mats
            if name in store:  # a layer called twice: its gradient sums its calls
                v = store[name] + v
            store[name] = v
            if store is mats:
                norms_of[name] = row_norms(v)  # while hot; accurate for long rows

        def sink(call: LayerCall, g: torch.Tensor) -> None:
            if call.kind == "window_attention":
                keep(call.key + "relative_position_bias_table", pack.to_records(bias_table_grads(call, g, n)))
                return
            if call.kind == "layer_norm":
                for pname, v in layer_norm_grads(call, g, n).items():
                    keep(call.key + pname, pack.to_records(v))
                return
            a, g = linear_io(call, g, n)
            if "bias" in call.own:
                keep(call.key + "bias", pack.to_records(g.sum(1, dtype=torch.float32)))  # no float32 copy of g
            if "weight" not in call.own:
                return
            name = call.key + "weight"
            d_in, d_out = a.shape[-1], g.shape[-1]
            if name in ghosts or (name not in mats and name not in small
                                  and use_ghost(a.shape[1] * pack.per_record, d_in, d_out, self.route)):
                if self._tf32(g):
                    a = as_multiplied(a, g)  # the Grams and the product then take TF32 numbers only
                ghosts.setdefault(name, []).append((a, g))  # kept for the book-keeping product
                self.choices[call.key] = "ghost"
            else:
                ga, aa = _product_operands(g, a)
                keep(name, pack.to_records(f32(torch.bmm(ga.transpose(1, 2), aa))), _SMALL_WEIGHT)  # (n, d_out, d_in)
                self.choices[call.key] = "materialise"

        losses = self.recorder.run(x, y, sink)
        # No graph (the stored activations belong to it), no autocast, float32 products in full
        # float32: a clipped record must add exactly what its norm measured (`exact_arithmetic`).
        with exact_arithmetic(x.device.type):
            # The many small gradients side by side (~32 KiB a record at swin_micro): one norm, one product.
            small_names = list(small)
            joined = torch.cat([small.pop(k) for k in small_names], 1) if small_names else None
            # Each record's squared norm, part by part, summed once at the end: one kernel
            # instead of an add per ghost layer (a GPU step launched ~1.7x plain's kernels).
            norms_now = ([row_norms(joined)] if joined is not None else []) + list(norms_of.values())
            parts = [torch.stack(norms_now).square_()] if norms_now else []  # (k, R) each
            for calls in ghosts.values():
                a = torch.cat([c[0] for c in calls], 1) if len(calls) > 1 else calls[0][0]  # tokens of all calls
                g = torch.cat([c[1] for c in calls], 1) if len(calls) > 1 else calls[0][1]
                # Autocast's bf16 / fp16 activations and gradients: exact TF32 products (or
                # bf16 GEMMs with float32 output).
                with tf32_products() if self._tf32(g) else contextlib.nullcontext():
                    parts.append(ghost_sq_norms(pack.pad_tokens(a), pack.pad_tokens(g), bf16=self._bf16(g))[None])
            if not parts:  # no trainable layer reached: zero norms
                parts.append(torch.zeros(1, n_records, device=x.device, dtype=torch.float32))
            norms = (parts[0] if len(parts) == 1 else torch.cat(parts)).sum(0).sqrt_()
            tf32 = any(self._tf32(g) for calls in ghosts.values() for _, g in calls)
            factors = clip_factors(norms * (1 + TF32_MARGIN) if tf32 else norms, max_grad_norm)
            ready(out)  # the caller's buffers, made now if made on demand (after backward's peak)
            # sum_r c_r G_r: (P, R) @ (R,), in place into the caller's buffers
            if joined is not None:
                self._scatter_add(out, small_names, torch.mv(joined.t(), factors))
            for target, name in zip(self._flat_views(out, list(mats), slot=1), mats):
                target.addmv_(mats[name].t(), factors)
            per_sample = factors if pack.local is None else factors[pack.local]  # (n,)
            for name, calls in ghosts.items():
                target = out[name].view(out[name].shape[0], -1)  # (d_out, d_in)
                for a, g in calls:
                    # Float32, also under autocast: the norm above is that of the float32 product
                    # of these (a, g), so the clipped contribution must be that same product times
                    # its factor. In bf16 the factor and the batch's summed product were rounded
                    # to 8 bits: a record could add ~0.3% more than C, and the sum's rounding was
                    # bounded by no single record (tests/privacy/test_routes.py).
                    c = per_sample.view(-1, 1, 1)  # each token times its record's factor,
                    scale_a = a.shape[-1] < g.shape[-1]  # on the smaller operand: a float32 product
                    bf16 = self._bf16(g)  # the unscaled operand stays bf16 (no float32 copy)
                    if scale_a:  # (bf16 / fp16 times float32 promotes: no float32 copy first)
                        a2, g2 = a * c, (g if bf16 else f32(g))
                    else:
                        a2, g2 = (a if bf16 else f32(a)), g * c
                    g2, a2 = g2.reshape(-1, g2.shape[-1]).t(), a2.reshape(-1, a2.shape[-1])  # (d_out, nT), (nT, d_in)
                    if not self._tf32(g):
                        target.addmm_(g2, a2)  # (c . g)^T a: one plain-size product, in place
                        continue
                    # Autocast: the unscaled operand holds bf16 / fp16 values, the scaled one is
                    # split into three bf16-valued parts that sum to it exactly: three exact TF32
                    # products instead of one IEEE float32 product (on an H100 / H200 about 7x
                    # slower than TF32; this block was a third of a bf16 step's GEMM work).
                    if bf16:  # the same three exact products, as bf16 GEMMs with float32 output
                        for part in _split_bf16(a2 if scale_a else g2, as_bf16=True):
                            target.add_(bf16_product(g2, part) if scale_a else bf16_product(part, a2))
                        continue
                    with tf32_products():
                        for part in _split_bf16(a2 if scale_a else g2):
                            if scale_a:
                                target.addmm_(g2, part)
                            else:
                                target.addmm_(part, a2)
        return norms, losses


__all__ = ["MixedClipper", "ROUTES", "TF32_MARGIN", "ghost_sq_norms", "use_ghost"]
