"""DP-SGD overhead: private step time and peak memory relative to a plain step.

    python bench/dp_overhead.py [--preset swin_micro] [--steps N] [--block K] [--batch B]
                                [--device cpu|cuda] [--threads 1] [--profile] [--amp bf16]

Without --preset it measures swin_micro on CPU and, when CUDA is present, swin_tiny
(224 px) on CUDA. For each model it times, side by side in interleaved rounds of --block
consecutive steps per variant (median over --steps; block 5: as in training, most steps
follow a step of their own kind; block 1: the older protocol), one optimiser step of

- plain training of the whole model vs full-model DP-SGD (`mammodp.privacy.make_private`:
  per-record clipping, noise, AdamW step) with the default route (`auto` = mixed ghost
  clipping with book-keeping, checked against vmap on the first step), and with the
  `ghost`, `hooks` (materialised per-sample gradients) and torch.func `vmap` routes
  (--routes; on CUDA only auto and hooks by default; `auto-ieee`: auto with its clipping
  products in IEEE float32 under --amp, as before 2026-12-05 (on the recorded inputs as
  autocast rounded them), for a side-by-side A/B of the
  exact TF32 products; `auto-bf16`: auto with those products as bf16 GEMMs with float32
  output, `MixedClipper.bf16_gemm`);
- plain training of the head on a frozen backbone vs head-only DP-SGD (same engine), and
  vs Opacus' own GradSampleModule + DPOptimizer on the head (backbone features computed
  without gradients), the one Opacus route that runs on a Swin.

The headline comparisons (plain, default DP, Opacus) are timed in one interleaved loop,
the other routes in a second loop beside their own plain steps (their long steps and large
allocations would otherwise perturb the headline pairs).

Time: on CPU the per-step CPU time of this process (`time.process_time`) -- on a shared
machine wall time also counts the moments other jobs hold the core; with one thread
(--threads 1) CPU time is the step's own compute. Wall-clock ratios are printed beside
it. On CUDA wall-clock time (synchronised).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` above the memory held before the
step. On CPU PyTorch keeps no allocator peak, so the CPU figure is the peak of live tensor
bytes reconstructed from `torch.profiler(profile_memory=True)` allocation events (op
granularity: a transient buffer allocated and freed inside one kernel is not seen). RSS or
tracemalloc deltas are not used: the CPU allocator caches and tracemalloc misses it. Every
variant zeroes its gradients at the end of its step (`zero_grad(set_to_none=True)`: what a
loop that zeroes before its next forward frees before it), so plain training and Opacus keep
nothing between steps; what the DP engine still holds before a step (its float32
clipped-sum buffer and the noisy-gradient buffer whose views are `.grad`, as far as it has not
given their memory back) is added where the step's peak cannot show it (`_engine_held`). (Until 2026-12-05 the noisy-gradient
buffer was left out, and Opacus zeroed after its frozen backbone's forward, so its per-sample
gradients of the previous step were counted at that forward's peak: Opacus' memory was
overstated by about them, ~4% at swin_micro.)

Batches are the same for every variant: q = 1 over B records, so each Poisson batch holds
all B samples and the DP step does exactly the work of a B-sample step.

--profile prints torch.profiler's top operators of the plain and the default DP step (and of
the hooks route when it is measured): self CPU time on CPU, the profile that guided the mixed
route (see `mammodp/privacy/ghost.py`); on CUDA self GPU time, with the GPU time and the
number of device events (kernels, memcpy, memset) per step. --device-time (CUDA) prints, per
variant, the wall time, the host time (until the step returned, i.e. its kernels were queued)
and the device's busy time per step: a step whose device is busy for much less than its wall
time is bound by the host (Python, dispatch, launches) or by a read-back, not by the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammodp.models.swin import PRESETS, create_classifier, trainable_parameters  # noqa: E402
from mammodp.privacy import make_private, per_sample  # noqa: E402

LOSS = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
ROUTES = ("auto", "ghost", "hooks", "vmap")  # full-model DP routes measured on CPU by default
CUDA_ROUTES = ("auto", "hooks")  # on CUDA (Swin-T 224): ghost's 3136 x 3136 Grams and vmap take minutes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of live tensor bytes allocated by `fn` (CPU), from profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    points = []
    for e in prof.events():
        # Allocations inside an op are charged to the op (self memory); those outside any
        # op appear as "[memory]" events.
        m = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if m:
            points.append((e.time_range.start, m))
    points.sort()
    live = peak = 0
    for _, m in points:
        live += m
        peak = max(peak, live)
    return peak


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak_bytes(fn)


def _engine_held(engine, device: torch.device) -> Callable[[], int]:
    """Bytes the DP engine holds before a step that the step's own peak does not show: its
    float32 clipped-sum buffer and its noisy-gradient buffer (views: `.grad`), as far as they
    still have memory (the engine gives it back between steps). On CUDA the peak is taken
    above the memory allocated before the step, so all of it is added back; on the CPU the
    profiler sees neither those allocations nor their release, so only what stays allocated
    through the step: the noisy-gradient buffer, if a `.grad` still holds its view (the
    engine releases it when a step begins otherwise; the clipped sums are made in the step)."""
    def held() -> int:
        flat, grad = getattr(engine, "_flat", None), getattr(engine, "_grad_flat", None)
        nbytes = [0 if t is None else t.untyped_storage().nbytes() for t in (flat, grad)]
        if device.type == "cuda":
            return sum(nbytes)
        views = getattr(engine, "_grad_views", {})
        kept = any(p.grad is views.get(name) for name, p in engine._params.items())
        return nbytes[1] if kept else 0
    return held


def _layernorm_fp32(model: torch.nn.Module) -> None:
    """CUDA autocast's LayerNorm policy, imposed on any device: every LayerNorm runs in float32
    (CUDA autocast casts its input up; CPU autocast runs it in its input's dtype, bf16 after
    the first bf16 layer), so the Linear layers after LayerNorms take float32 inputs that
    autocast casts, as in a bf16 run on a GPU."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_pre_hook(lambda mod, args: (args[0].float(), *args[1:]))


def _variants(preset: str, device: torch.device, batch: int, grad_chunk: int, size: int,
              routes: tuple[str, ...] = ROUTES, amp: torch.dtype | None = None, layernorm_fp32: bool = False):
    """name -> step function, name -> DP engine, and name -> bytes held between steps, for
    one preset. Every model starts from the same weights. `amp`: the forward of every variant
    under autocast to that dtype (as `train.amp` runs it), else float32; `layernorm_fp32`:
    every variant with `_layernorm_fp32`."""

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=g).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    records = np.arange(batch)
    steps: dict[str, Callable[[], None]] = {}
    engines: dict[str, object] = {}
    held: dict[str, Callable[[], int]] = {}

    head_routes = tuple(r for r in ("auto", "vmap") if r in routes) or ("auto",)
    for mode, tag, methods in (("full", "full", routes), ("frozen_backbone", "head", head_routes)):
        base = create_classifier(preset, mode=mode).to(device).train()
        if layernorm_fp32:
            _layernorm_fp32(base)

        plain = copy.deepcopy(base)
        plain_opt = torch.optim.AdamW(trainable_parameters(plain), lr=1e-4)

        def plain_step(model=plain, opt=plain_opt):
            with autocast():
                logits = model(x)
            LOSS(logits.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[f"{tag}/plain"] = plain_step
        for method in methods:
            private = copy.deepcopy(base)
            private_opt = torch.optim.AdamW(trainable_parameters(private), lr=1e-4)
            engine = make_private(private, private_opt, record_ids=records, expected_batch_size=batch, delta=1e-5,
                                  epochs=1, max_grad_norm=1.0, noise_multiplier=1.0, accountant="rdp",
                                  privacy_unit="patch", sampler_seed=0, grad_chunk=grad_chunk,
                                  physical_batch_size=batch,
                                  per_sample_method=method.removesuffix("-ieee").removesuffix("-bf16"),
                                  autocast_dtype=amp)
            if method.endswith(("-ieee", "-bf16")):  # the clipping products' A/B (under --amp)
                route = engine._route_for(LOSS)
                if method.endswith("-ieee") and hasattr(route, "tf32"):  # IEEE float32
                    route.tf32 = False
                if method.endswith("-bf16") and hasattr(route, "bf16_gemm"):  # bf16 GEMMs, float32 output
                    route.bf16_gemm = True
                    native = per_sample.bf16_f32_gemms(device)
                    print(f"# {method}: bf16 GEMMs with float32 output on {device.type}: "
                          + ("yes" if native else "no (float32 copies multiplied instead)"))

            def dp_step(engine=engine, opt=private_opt):
                idx = engine.sample_batch()  # q = 1: all B samples, in order (x[idx] is x: no copy)
                engine.step(x, y, LOSS, record_idx=idx)
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[f"{tag}/dp-{method}"] = dp_step
            engines[f"{tag}/dp-{method}"] = engine
            held[f"{tag}/dp-{method}"] = _engine_held(engine, device)

        if mode == "frozen_backbone":
            import warnings

            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            op_model = copy.deepcopy(base)
            gsm = GradSampleModule(op_model.head, loss_reduction="mean")
            op_opt = DPOptimizer(torch.optim.AdamW(gsm.parameters(), lr=1e-4), noise_multiplier=1.0,
                                 max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="mean")

            def opacus_step(model=op_model, gsm=gsm, opt=op_opt):
                with torch.no_grad(), autocast():
                    feats = model.backbone(model.preprocess(x))  # frozen: no graph
                with warnings.catch_warnings():  # "full backward hook ... no inputs require gradients"
                    warnings.simplefilter("ignore", UserWarning)
                    with autocast():  # the head in the same precision as ours
                        logits = gsm(feats)
                    LOSS(logits.float(), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)  # per-sample, summed and noisy gradients freed

            steps["head/opacus"] = opacus_step
    return steps, engines, held


def _profile(steps: dict[str, Callable[[], None]], names: list[str], device: torch.device, rows: int = 20) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name in names:
        with profile(activities=acts) as prof:
            for _ in range(3):
                steps[name]()
            _sync(device)
        avg = prof.key_averages()
        print(f"## torch.profiler, {name}, 3 steps (profiler overhead inflates small ops)")
        if cuda:  # GPU kernels' time, and the kernel count (launch-bound steps have many small ones)
            kernels = _device_events(prof.events())
            busy = sum(e.device_time_total for e in _device_events(avg))
            print(f"# {len(kernels) // 3} device events (kernels, memcpy, memset) per step, {busy / 3e3:.1f} ms of "
                  "device time per step")
        print(avg.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows,
                        max_name_column_width=48))


def _time_interleaved(steps: dict[str, Callable[[], None]], reps: int, device: torch.device, block: int = 1):
    """Median wall and CPU (process) time of each step over `reps` steps per variant, taken in
    interleaved rounds of `block` consecutive steps per variant.

    Interleaving makes machine-load drifts hit every variant alike. With block 1 every step
    follows another variant's step (another model, other buffer sizes); with block > 1 all but
    the first step of a block follow a step of their own kind, as in training. On the
    project's CPU machine the two gave full-model ratios within ~0.02x of each other (README,
    Benchmark)."""
    wall: dict[str, list[float]] = {k: [] for k in steps}
    proc: dict[str, list[float]] = {k: [] for k in steps}
    host: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(max(1, reps // block)):
        for name, fn in steps.items():
            for _ in range(block):
                _sync(device)
                t, c = time.perf_counter(), time.process_time()
                fn()
                host[name].append(time.perf_counter() - t)  # until the step returned (CUDA: queued)
                _sync(device)
                wall[name].append(time.perf_counter() - t)
                proc[name].append(time.process_time() - c)
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(wall), med(proc), med(host)


def _device_events(events) -> list:
    """The profiler's device events that are device work (kernels, copies, fills): not the GPU
    copies of `record_function` ranges (every optimizer step is one), which span the kernels
    inside them and the idle gaps between (torch's own tables leave them out too)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def _device_busy(steps: dict[str, Callable[[], None]], device: torch.device, n: int = 3) -> dict[str, float]:
    """Seconds per step the GPU spends in kernels, copies and fills (torch.profiler's device
    events over `n` steps of each variant; one stream, so nothing overlaps)."""
    from torch.profiler import ProfilerActivity, profile

    busy = {}
    for name, fn in steps.items():
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            _sync(device)
        busy[name] = sum(e.device_time_total for e in _device_events(prof.key_averages())) / n / 1e6
    return busy


def bench(preset: str, device: torch.device, reps: int, batch: int, grad_chunk: int, profile: bool = False,
          routes: tuple[str, ...] | None = None, amp: torch.dtype | None = None, block: int = 5,
          layernorm_fp32: bool = False, device_time: bool = False) -> None:
    """Measure and print the ratios for one preset on one device."""
    size = PRESETS[preset]["img_size"]
    routes = routes or (ROUTES if device.type == "cpu" else CUDA_ROUTES)
    routes = ("auto",) + tuple(r for r in routes if r != "auto")  # the default route is always measured
    steps, engines, held = _variants(preset, device, batch, grad_chunk, size, routes, amp, layernorm_fp32)
    for fn in steps.values():  # warm-up: lazy imports, vmap set-up, the auto check, cuDNN autotuning
        fn()
        fn()
    cpu = device.type == "cpu"
    # The headline comparisons (plain, default DP, Opacus) in one interleaved loop; the other
    # routes in a second one with their own plain steps, so that their large allocations and
    # long steps do not perturb the headline pairs.
    main = ["full/plain", "full/dp-auto", "head/plain", "head/dp-auto", "head/opacus"]
    others = [k for k in steps if k not in main]
    med_wall: dict[str, float] = {}
    med: dict[str, float] = {}
    med_host: dict[str, float] = {}
    for group, tag in ((main, ""), (["full/plain", "head/plain", *others] if others else [], "2")):
        w, c, h = _time_interleaved({k: steps[k] for k in group}, reps, device, block)
        for into, got in ((med_wall, w), (med, c if cpu else w), (med_host, h)):
            into.update({k + (tag if k.endswith("plain") else ""): v for k, v in got.items()})
    # The step's own peak plus what the DP engine holds for the run (allocated before the step,
    # so the profiler cannot see it; plain training and Opacus hold nothing: they zero at the end).
    peak = {}
    for k, fn in steps.items():
        before = held[k]() if k in held else 0  # read before the step runs (it changes what is held)
        peak[k] = before + _peak_bytes(fn, device)
    mem_how = "torch.cuda.max_memory_allocated" if not cpu else "torch.profiler live-tensor peak"
    time_how = "CPU time (process_time)" if cpu else "wall time"
    n_full = sum(p.numel() for p in create_classifier(preset).parameters())
    precision = f"autocast {str(amp).removeprefix('torch.')}" if amp is not None else "float32"
    if layernorm_fp32:
        precision += " (LayerNorms in float32, as on CUDA)"
    print(f"# {preset} ({n_full / 1e6:.2f}M params) on {device} ({torch.get_num_threads()} CPU threads), "
          f"batch {batch}, grad_chunk {grad_chunk}, {size} px, {precision}, median of {max(1, reps // block) * block} steps "
          f"interleaved in rounds of {block} per variant; "
          f"time: {time_how}; memory: {mem_how} (+ DP buffers held between steps)")
    auto = engines["full/dp-auto"]
    route = getattr(auto, "_route", None)
    choices = getattr(route[2], "choices", {}) if route else {}
    n_ghost = sum(v == "ghost" for v in choices.values())
    print(f"# auto route: {auto.per_sample_method}{' (' + auto.method_note + ')' if auto.method_note else ''}; "
          f"Linear/patchify layers by ghost norm: {n_ghost} of {len(choices)}")

    def line(label: str, dp: str, ref: str, mem_ref: str | None = None) -> None:
        mem_ref = mem_ref or ref
        extra = f", wall {med_wall[dp] / med_wall[ref]:.2f}x" if cpu else ""
        print(f"{label}: time {med[dp] / med[ref]:.2f}x{extra}, peak memory {peak[dp] / max(peak[mem_ref], 1):.2f}x"
              f"   ({med[dp] * 1e3:.1f} ms vs {med[ref] * 1e3:.1f} ms; "
              f"{peak[dp] / 2**20:.1f} MiB vs {peak[mem_ref] / 2**20:.1f} MiB)")

    line("full-model DP (auto: mixed)", "full/dp-auto", "full/plain")
    line("head-only DP (auto: mixed)", "head/dp-auto", "head/plain")
    line("head-only Opacus GradSampleModule", "head/opacus", "head/plain")
    line("head-only DP vs Opacus", "head/dp-auto", "head/opacus")
    if others:
        print("# other routes (second interleaved loop, against its own plain steps):")
    for route in routes[1:]:
        line(f"full-model DP ({route} route)", f"full/dp-{route}", "full/plain2", "full/plain")
    if "head/dp-vmap" in steps:
        line("head-only DP (vmap route)", "head/dp-vmap", "head/plain2", "head/plain")
    if device_time and not cpu:
        # Where a CUDA step's time goes: a device busy for less than the wall time idled, waiting
        # for the host (which queued the step's kernels for `host` ms) or for a read-back.
        busy = _device_busy(steps, device)
        print("# CUDA, per step: wall (synchronised) / host (until the step returned: its kernels queued) / "
              "device busy (kernels, copies, fills; torch.profiler, 3 steps) / busy share of wall")
        for k in steps:
            w = med_wall.get(k, med_wall.get(k + "2"))
            h = med_host.get(k, med_host.get(k + "2"))
            print(f"#   {k}: {w * 1e3:.1f} / {h * 1e3:.1f} / {busy[k] * 1e3:.1f} ms / {busy[k] / w:.0%}")
    if profile:
        names = ["full/plain", "full/dp-auto"] + (["full/dp-hooks"] if "full/dp-hooks" in steps else [])
        _profile(steps, names, device)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the benchmark(s)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="one preset (default: micro on CPU + tiny on CUDA)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    ap.add_argument("--steps", type=int, default=40,
                    help="timed steps per variant (rounded down to whole rounds of --block, at least one)")
    ap.add_argument("--block", type=int, default=5,
                    help="consecutive steps per variant in each interleaved round (1: every step follows "
                         "another variant's; training runs one kind back to back)")
    ap.add_argument("--batch", type=int, default=32, help="samples per step")
    ap.add_argument("--grad-chunk", type=int, default=32, help="samples per per-sample-gradient pass")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 gives steadier CPU timings on a shared machine)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables (plain vs DP)")
    ap.add_argument("--device-time", action="store_true",
                    help="CUDA: also print each variant's host (queueing) time and device busy time per step: "
                         "whether a step is bound by the GPU or by the host")
    ap.add_argument("--routes", default=None,
                    help=f"comma-separated DP routes to measure beside auto (default: {','.join(ROUTES)} on CPU, "
                         f"{','.join(CUDA_ROUTES)} on CUDA)")
    ap.add_argument("--amp", choices=("bf16",), default=None,
                    help="every variant's forward under bf16 autocast (as train.amp runs it on CUDA)")
    ap.add_argument("--layernorm-fp32", action="store_true",
                    help="with --amp on the CPU: LayerNorms in float32, as CUDA's autocast runs them (CPU "
                         "autocast runs them in bf16 after the first bf16 layer): the GPU's bf16 memory picture")
    ap.add_argument("--allocator", choices=("keep", "default"), default="keep",
                    help="keep: glibc keeps freed memory, as `mammodp train` sets it on CPU "
                         "(runtime.keep_freed_memory), for every variant alike; default: glibc's defaults")
    args = ap.parse_args(argv)
    if args.allocator == "keep":
        from mammodp.runtime import keep_freed_memory

        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs: list[tuple[str, torch.device]]
    if args.preset:
        runs = [(args.preset, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))]
    else:
        runs = [("swin_micro", torch.device(args.device or "cpu"))]
        if torch.cuda.is_available() and args.device in (None, "cuda"):
            runs.append(("swin_tiny", torch.device("cuda")))
    for preset, device in runs:
        routes = tuple(r for r in args.routes.split(",") if r) if args.routes else None
        amp = torch.bfloat16 if args.amp == "bf16" else None
        bench(preset, device, args.steps, args.batch, args.grad_chunk, args.profile, routes, amp, args.block,
              args.layernorm_fp32, args.device_time)


if __name__ == "__main__":
    main()
