"""Device work of one training step, plain vs DP-SGD routes, counted without a GPU.

    python bench/dp_flops.py [--preset swin_tiny] [--batch 128] [--grad-chunk N] [--amp bf16]
                             [--routes mixed,ghost,hooks,mixed-ieee,mixed-bf16] [--unit patch|patient]

(`mixed-ieee`: mixed with its clipping products in IEEE float32 under autocast, as before
2026-12-05; `mixed-bf16`: those products as bf16 GEMMs with float32 output,
`MixedClipper.bf16_gemm`.)

Counts one step of each variant (a DP route's second: its first builds what it keeps for
the run) on PyTorch's `meta` device (shapes only: no memory is
allocated and nothing is computed, so Swin-T at 224 px and batch 128 takes seconds on a
CPU) and counts what a GPU would execute:

- GEMM work (matrix products and convolutions, GFLOP = 2 x multiply-adds, by torch's own
  flop formulas), split by where it runs:
  `model` -- the forward and backward of the network itself (under `train.amp` these run
  in autocast's bf16 on CUDA);
  `rules` -- the per-sample rules inside backward (materialised per-sample products: bf16
  under autocast, as autocast ran the layer);
  `clip` -- the clipping block (`per_sample.exact_arithmetic`: ghost-norm Grams,
  book-keeping products, clipped sums), float32 also under autocast, because a clipped
  record must add exactly what its norm measured (README, "A privacy fix found on the
  way"): `IEEE` products run without TF32 (on an H100 / H200 at about 1/15 of the bf16
  rate: what a bf16 run pays for exactness), `TF32` ones on tensor cores with operands
  that TF32 does not round (`per_sample.tf32_products`: bf16 activations and gradients,
  and three-part splits of the scaled operand, so three products where IEEE takes one);
  `bf16 in, float32 out` ones are the same products as bf16 GEMMs with float32 output
  (`per_sample.bf16_product`: twice TF32's peak rate, no float32 copies of the operands).
- bytes written by operators (outputs of non-view ops, in-place results included): a
  proxy of memory traffic, which bounds the elementwise kernels;
- operator calls (aten, the dispatcher's count: host work, each a trip through
  torch's dispatcher), and of them the kernels: calls that do device work (not views,
  not bare allocations, not calls on host tensors only; about the number of kernels a GPU
  launches, each costing the host a launch however small the kernel).

Plain is forward + backward of the mean loss with weight gradients; a DP variant is
`per_sample.clipped_grad_sum` (forward, backward, per-record clipping, clipped sum) with
one pack of `--grad-chunk` samples. Both leave out the optimiser step (the same in both)
and DP's noise draw (one normal draw and one add over the parameters). Meta tensors do
not run autocast: `--amp bf16` counts the model as autocast runs it (`_autocast_like`:
Linear and convolution layers in bf16 on bf16 inputs, LayerNorms and the residual stream in
float32; softmax in bf16, where autocast uses float32), which is what sends the clipping
block's ghost layers down their TF32 path.

What it cannot show: time. Kernel efficiency, launch overhead and host time are left to
`bench/dp_overhead.py` on a device.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammodp.models.swin import PRESETS, create_classifier, trainable_parameters  # noqa: E402
from mammodp.privacy import ghost, grad_sampler, per_sample  # noqa: E402

LOSS = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
# -ieee: MixedClipper.tf32 = False; -bf16: MixedClipper.bf16_gemm = True
ROUTES = ("mixed", "ghost", "hooks", "mixed-ieee", "ghost-ieee", "mixed-bf16", "ghost-bf16")
_aten = torch.ops.aten
# In-place and matrix-vector products that torch's flop registry does not list.
_INPLACE = {_aten.addmm_: _aten.addmm, _aten.baddbmm_: _aten.baddbmm}
_SCATTERS = {_aten.index_add_, _aten.index_copy_, _aten.scatter_add_}  # (self, dim, index, source)
_MATVEC = {_aten.mv: 0, _aten.addmv: 1, _aten.addmv_: 1}  # position of the matrix argument


def _gemm_flops(func, args, kwargs, out) -> int:
    packet = func.overloadpacket
    if packet in _MATVEC:
        return 2 * args[_MATVEC[packet]].numel()
    packet = _INPLACE.get(packet, packet)
    fn = flop_registry.get(packet)
    return int(fn(*args, **kwargs, out_val=out)) if fn is not None else 0


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


# Allocations without a fill, and a view that its schema does not mark as one: no kernel.
_NO_KERNEL = {_aten.empty, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided, _aten.empty_like,
              _aten._unsafe_view}


def _launches(func, args, kwargs, out) -> bool:
    """Whether an operator call is device work (about one kernel a GPU launches): not a view,
    not a bare allocation, and on the device (the meta device stands in for it; a call on host
    tensors only, e.g. the engine's record book-keeping, launches nothing)."""
    if _is_view(func) or func.overloadpacket in _NO_KERNEL:
        return False
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta"
               for t in (*args, *kwargs.values(), *outs))


class Counter(TorchDispatchMode):
    """Tallies GEMM flops, bytes written and operator calls per phase (`self.phase`)."""

    def __init__(self):
        super().__init__()
        self.phase = "model"
        self.flops: collections.Counter = collections.Counter()
        self.written: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()  # (phase, operator) -> calls
        self.kernels: collections.Counter = collections.Counter()  # device work calls (`_launches`)

    @contextlib.contextmanager
    def within(self, phase: str):
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls[self.phase] += 1
        self.ops[self.phase, str(func.overloadpacket)] += 1
        if _launches(func, args, kwargs, out):
            self.kernels[self.phase] += 1
        flops = _gemm_flops(func, args, kwargs, out)
        if flops:
            self.flops[self.phase] += flops
            factor = next(a for a in args[1:] if isinstance(a, torch.Tensor))  # not an addmm's sum
            if factor.dtype == torch.float32:
                tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"
                self.flops["TF32" if tf32 else "IEEE"] += flops
            elif isinstance(out, torch.Tensor) and out.dtype == torch.float32:  # bf16 in, float32 out
                self.flops["BF16-F32"] += flops
        if func.overloadpacket in _SCATTERS:  # in place into a (large) buffer: writes its source's size
            src = args[3]
            self.written[self.phase] += src.numel() * src.element_size()
        elif not _is_view(func):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.written[self.phase] += t.numel() * t.element_size()
        return out


@contextlib.contextmanager
def _phases(counter: Counter):
    """Tag the per-sample rules (the recorder's sink) and the clipping block while counting."""
    run, exact = grad_sampler.Recorder.run, per_sample.exact_arithmetic

    def tagged_run(self, x, y, sink):
        def tagged_sink(call, g):
            with counter.within("rules"):
                sink(call, g)
        return run(self, x, y, tagged_sink)

    @contextlib.contextmanager
    def tagged_exact(device_type):
        with exact(device_type), counter.within("clip"):
            yield

    grad_sampler.Recorder.run = tagged_run
    per_sample.exact_arithmetic = ghost.exact_arithmetic = tagged_exact
    try:
        yield
    finally:
        grad_sampler.Recorder.run = run
        per_sample.exact_arithmetic = ghost.exact_arithmetic = exact


def _autocast_like(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """What autocast does to a Swin, for meta tensors (which autocast skips): LayerNorms in
    float32 (float32 parameters and input: the residual stream stays float32), every Linear
    and convolution on its input cast to `dtype`; softmax stays in `dtype` (autocast: float32)."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
            module.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.register_forward_pre_hook(lambda m, args, d=dtype: (args[0].to(d), *args[1:]))


def count(preset: str, batch: int, grad_chunk: int, routes: tuple[str, ...], unit: str,
          amp: torch.dtype | None = None) -> dict[str, Counter]:
    """One step of plain training and of each DP route (its second) on the meta device: name -> counts."""
    torch.manual_seed(0)
    dev = torch.device("meta")
    size = PRESETS[preset]["img_size"]
    dtype = amp or torch.float32
    x = torch.empty(batch, 1, size, size, device=dev, dtype=dtype)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    # patient unit: records of 2 patches each (the CBIS-DDSM median is 1-2 masses per patient)
    rec = torch.arange(batch) // (2 if unit == "patient" else 1)
    out: dict[str, Counter] = {}
    model = create_classifier(preset, mode="full").to(dev, dtype).train()
    if amp is not None:
        _autocast_like(model, amp)

    c = Counter()
    with c:
        LOSS(model(x).float(), y).backward()
    out["plain"] = c
    for p in trainable_parameters(model):
        p.grad = None
    for route in routes:
        method = route.removesuffix("-ieee").removesuffix("-bf16")
        obj = per_sample.make_route(model, LOSS, None, method)
        if route.endswith("-ieee"):
            obj.tf32 = False  # clipping products in IEEE float32 (the path before 2026-12-05)
        if route.endswith("-bf16"):
            obj.bf16_gemm = True  # clipping products as bf16 GEMMs with float32 output
        # Into one flat float32 buffer whose views are made once and which is zeroed once a
        # step, as the engine's step does (fresh per-parameter zeros each step would add a
        # fill per parameter: 175 calls at Swin-T, counted here before 2026-12-05's last day).
        params = per_sample.trainable_named_parameters(model)
        flat = torch.empty(sum(p.numel() for p in params.values()), device=dev)
        sums, start = {}, 0
        for name, p in params.items():
            sums[name] = flat[start : start + p.numel()].view(p.shape)
            start += p.numel()
        # The second step is counted: a route's first step builds what it keeps for the run
        # (the small gradients' positions in the flat buffer, flat views of it: 141 calls at
        # Swin-T, once a run, counted as every step's until stop 29).
        for counted in (False, True):
            c = Counter()
            with _phases(c), (c if counted else contextlib.nullcontext()):
                flat.zero_()
                per_sample.clipped_grad_sum(model, LOSS, x, y, max_grad_norm=1.0, record_ids=rec,
                                            grad_chunk=grad_chunk, route=obj, out=sums)
        out[route] = c
    return out


def report(preset: str, batch: int, grad_chunk: int, routes: tuple[str, ...], unit: str,
           amp: torch.dtype | None = None) -> None:
    counts = count(preset, batch, grad_chunk, routes, unit, amp)
    n_params = sum(p.numel() for p in create_classifier(preset).parameters())
    print(f"# {preset} ({n_params / 1e6:.1f}M params, {PRESETS[preset]['img_size']} px), batch {batch}, "
          f"one pack of {grad_chunk}, privacy unit {unit}, model in {str(amp or torch.float32)[6:]}; "
          "meta device: counts, not time")
    print("| variant | GEMM GFLOP: model | rules | clip | total vs plain | of all: IEEE float32 | exact TF32 "
          "| bf16 in, float32 out | GiB written (vs plain) | operator calls (vs plain) | of them kernels (vs plain) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = counts["plain"]
    tot_plain = base.flops["model"]
    wr_plain = sum(base.written.values())
    calls_plain = sum(base.calls.values())
    kernels_plain = sum(base.kernels.values())
    for name, c in counts.items():
        tot = sum(v for k, v in c.flops.items() if k in ("model", "rules", "clip"))
        wr = sum(c.written.values())
        calls = sum(c.calls.values())
        kernels = sum(c.kernels.values())
        print(f"| {name} | {c.flops['model'] / 1e9:.4g} | {c.flops['rules'] / 1e9:.4g} | {c.flops['clip'] / 1e9:.4g} "
              f"| {tot / tot_plain:.2f}x | {c.flops['IEEE'] / 1e9:.4g} | {c.flops['TF32'] / 1e9:.4g} "
              f"| {c.flops['BF16-F32'] / 1e9:.4g} "
              f"| {wr / 2**30:.1f} ({wr / wr_plain:.2f}x) | {calls} ({calls / calls_plain:.2f}x) "
              f"| {kernels} ({kernels / kernels_plain:.2f}x) |")
    for name in routes:
        c = counts[name]
        print(f"# {name}: GEMM work in IEEE float32 = {c.flops['IEEE'] / tot_plain:.0%}, in exact TF32 = "
              f"{c.flops['TF32'] / tot_plain:.0%} of plain's whole GEMM work")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="swin_tiny")
    ap.add_argument("--batch", type=int, default=128, help="samples per step")
    ap.add_argument("--grad-chunk", type=int, default=None, help="samples per pass (default: the batch)")
    ap.add_argument("--routes", default="mixed,ghost,hooks", help=f"comma-separated, of {', '.join(ROUTES)}")
    ap.add_argument("--unit", choices=("patch", "patient"), default="patch")
    ap.add_argument("--amp", choices=("bf16",), default=None,
                    help="count the model in bf16 (as train.amp's autocast runs it on CUDA)")
    args = ap.parse_args(argv)
    routes = tuple(r for r in args.routes.split(",") if r)
    for r in routes:
        if r not in ROUTES:
            ap.error(f"unknown route {r!r}; known: {', '.join(ROUTES)}")
    report(args.preset, args.batch, args.grad_chunk or args.batch, routes, args.unit,
           torch.bfloat16 if args.amp else None)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
