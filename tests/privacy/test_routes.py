"""Every route the engine can choose (vmap, hooks, mixed, ghost) gives the clipped sum of a
per-sample autograd loop -- patch and patient records, physical chunks that split the
batch, bf16 autocast on CUDA --; `auto` checks its route once per run against vmap and
falls back (recorded) when it disagrees."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

import mammodp.privacy.engine as engine_mod
import mammodp.privacy.ghost as ghost
from mammodp.models.swin import create_classifier, trainable_parameters
from mammodp.privacy import make_private
from mammodp.privacy.engine import DPSGD
from mammodp.privacy.ghost import MixedClipper, ghost_sq_norms, use_ghost
from mammodp.privacy.per_sample import clipped_grad_sum, make_route, per_sample_loss_fn, trainable_named_parameters

LOSS = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
ROUTES = ["vmap", "hooks", "mixed", "ghost"]


def _batch(n: int, seed: int = 0, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g)


def _loop_record_grads(model, x, y, records, autocast_dtype=None):
    """Reference: one ordinary backward per sample, summed per record (ascending record id).

    Returns ({name: (R, *shape)} per-record gradients, (R,) their norms)."""
    named = trainable_named_parameters(model)
    per_record: dict[int, list[torch.Tensor]] = {}
    for i in range(x.shape[0]):
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x[i : i + 1])
        grads = torch.autograd.grad(LOSS(logits.float(), y[i : i + 1]), list(named.values()))
        r = int(records[i])
        if r in per_record:
            per_record[r] = [a + b.float() for a, b in zip(per_record[r], grads)]
        else:
            per_record[r] = [g.float() for g in grads]
    keys = sorted(per_record)
    stacked = {n: torch.stack([per_record[k][j] for k in keys]) for j, n in enumerate(named)}
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in stacked.values()))
    return stacked, norms


def _clip_sum(per_record: dict, norms: torch.Tensor, C: float) -> dict:
    factors = (C / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("r,r...->...", factors, g) for n, g in per_record.items()}


def _loop_clipped_sum(model, x, y, records, C, autocast_dtype=None):
    per_record, norms = _loop_record_grads(model, x, y, records, autocast_dtype)
    return _clip_sum(per_record, norms, C), norms


def _assert_close(got: dict, ref: dict, rtol: float = 1e-4) -> None:
    assert set(got) == set(ref)
    for name, r in ref.items():
        scale = float(r.abs().max().clamp(min=1e-12))
        err = float((got[name] - r).abs().max()) / scale
        assert err < rtol, f"{name}: relative error {err:.3g}"


@functools.lru_cache(maxsize=None)
def _case(mode: str, unit: str):
    """A model, a batch and the loop's per-record gradients, shared by the tests of one case."""
    torch.manual_seed(0)
    model = create_classifier("swin_micro", mode=mode)
    x, y = _batch(7, seed=1)
    # patient 4 has 3 patches > grad_chunk (2): done over several passes; ids unsorted.
    records = torch.arange(7) if unit == "patch" else torch.tensor([4, 9, 4, 1, 9, 4, 0])
    per_record, norms = _loop_record_grads(model, x, y, records)
    C = float(norms.median())  # some records clipped, some not
    assert (norms > C).any() and (norms < C).any()
    return model, x, y, records, C, _clip_sum(per_record, norms, C), norms


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", ["full", "frozen_backbone"])
@pytest.mark.parametrize("unit", ["patch", "patient"])
def test_every_route_gives_the_clipped_sum_of_a_per_sample_loop(route, mode, unit):
    model, x, y, records, C, ref, ref_norms = _case(mode, unit)
    # vmap's packing is the generic code tested in test_per_sample: bigger passes keep it quick.
    chunk = 8 if route == "vmap" else 2
    res = clipped_grad_sum(model, LOSS, x, y, max_grad_norm=C, record_ids=records, grad_chunk=chunk, method=route)
    assert res.n_records == len(ref_norms) and res.n_samples == 7
    assert torch.allclose(res.norms, ref_norms, rtol=1e-4)
    _assert_close(res.grads, ref)


@functools.lru_cache(maxsize=None)
def _chunk_case():
    x, y = _batch(10, seed=2)
    patients = np.array([0, 0, 0, 0, 1, 2, 2, 3, 4, 4])  # patient 0 alone is larger than a chunk
    torch.manual_seed(2)
    model = create_classifier("swin_micro")
    per_record, norms = _loop_record_grads(model, x, y, torch.from_numpy(patients))
    C = float(norms.median())
    return model, x, y, patients, C, _clip_sum(per_record, norms, C)


@pytest.mark.parametrize("route", ["auto", *ROUTES])
def test_engine_chunks_that_split_the_batch_give_the_loop_result(route):
    base, x, y, patients, C, ref = _chunk_case()
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp = make_private(model, opt, record_ids=patients, privacy_unit="patient", expected_batch_size=5, delta=1e-4,
                      epochs=1, max_grad_norm=C, noise_multiplier=0.0, accountant="rdp", sampler_seed=0,
                      grad_chunk=2 if route != "vmap" else 4, physical_batch_size=3, per_sample_method=route)
    idx = dp.sample_batch()  # q = 1: every patient
    dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    assert dp.last_stats["records"] == 5 and 0 < dp.last_stats["clipped_fraction"] < 1
    assert dp.per_sample_method == ("mixed" if route == "auto" else route) and not dp.method_note
    # .grad = (sum of clipped patient gradients) / E with E = 5
    _assert_close({n: p.grad * 5 for n, p in model.named_parameters()}, ref)


def test_mixed_takes_ghost_norms_where_they_are_cheaper():
    assert use_ghost(16, 64, 192, "mixed") and not use_ghost(256, 16, 48, "mixed")  # Swin stage 3 vs stage 1
    assert use_ghost(256, 16, 48, "ghost")
    model = create_classifier("swin_micro")
    clipper = MixedClipper(model, LOSS, None)
    x, y = _batch(4)
    out = {n: torch.zeros_like(p) for n, p in trainable_named_parameters(model).items()}
    clipper.clipped_sum(x, y, None, 4, 1.0, out)
    assert clipper.choices["backbone.layers.0.blocks.0.attn.qkv."] == "materialise"  # T = 256, d = 16
    assert clipper.choices["backbone.layers.2.blocks.0.mlp.fc1."] == "ghost"  # T = 16, d = 64 x 256
    assert clipper.choices["head.0."] == "ghost"  # one token per sample
    # A ghost norm is the norm of the materialised per-sample gradient.
    a, g = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    w = torch.einsum("bto,bti->boi", g, a)
    assert torch.allclose(ghost_sq_norms(a, g), w.square().sum((1, 2)).float())


def test_frozen_backbone_features_are_computed_without_autograd():
    model = create_classifier("swin_micro", mode="frozen_backbone")
    seen = []
    model.backbone.register_forward_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    x, y = _batch(3)
    for route in ("mixed", "hooks", "vmap"):
        clipped_grad_sum(model, LOSS, x, y, max_grad_norm=1.0, method=route)
    assert seen == [True, True, True]


def test_the_engine_reuses_its_route_and_buffers_across_steps(monkeypatch):
    checks = []
    original = DPSGD._check_route
    monkeypatch.setattr(DPSGD, "_check_route", lambda self, *a: (checks.append(1), original(self, *a)))
    torch.manual_seed(3)
    model = create_classifier("swin_micro")
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp = make_private(model, opt, record_ids=np.arange(6), expected_batch_size=3, delta=1e-4, epochs=1,
                      max_grad_norm=1.0, noise_multiplier=1.0, accountant="rdp", sampler_seed=0)
    x, y = _batch(6)
    ptrs, routes = set(), set()
    for _ in range(4):
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        opt.step()
        ptrs.add(tuple(b.data_ptr() for b in dp._sums.values()))
        routes.add(id(dp._route[2]))
    assert len(checks) == 1  # the auto check runs once per run, not per step
    assert len(ptrs) == 1 and len(routes) == 1  # no per-step re-allocation or re-build
    assert all(torch.isfinite(p.grad).all() for p in trainable_parameters(model))


def test_auto_falls_back_to_vmap_when_the_route_is_broken_and_records_it(monkeypatch):
    x, y = _batch(6, seed=4)
    torch.manual_seed(4)
    model = create_classifier("swin_micro")
    ref, _ = _loop_clipped_sum(model, x, y, torch.arange(6), C=math.inf)
    # A deliberately broken route: ghost norms 50% too large.
    correct = ghost.ghost_sq_norms
    monkeypatch.setattr(ghost, "ghost_sq_norms", lambda a, g, **kw: correct(a, g, **kw) * 2.25)

    def engine(method):
        m = create_classifier("swin_micro")
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(trainable_parameters(m), lr=0.1)
        dp = make_private(m, opt, record_ids=np.arange(6), expected_batch_size=6, delta=1e-4, epochs=1,
                          max_grad_norm=0.05, noise_multiplier=0.0, accountant="rdp", sampler_seed=0,
                          per_sample_method=method)
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        return dp, {n: p.grad * 6 for n, p in m.named_parameters()}

    ref, _ = _loop_clipped_sum(model, x, y, torch.arange(6), C=0.05)
    unchecked, wrong = engine("mixed")  # an explicit route is trusted: the break shows
    with pytest.raises(AssertionError):
        _assert_close(wrong, ref)
    dp, grads = engine("auto")
    summary = dp.summary()
    assert summary["per_sample_method"] == "vmap"
    assert "mixed disagreed with vmap" in summary["per_sample_method_note"]
    _assert_close(grads, ref)  # the first step already used the fallback


@pytest.mark.parametrize("error", [RuntimeError("some op the route does not support"), torch.cuda.OutOfMemoryError("CUDA out of memory")])
def test_the_route_check_falls_back_on_a_failing_route_but_not_on_out_of_memory(monkeypatch, error):
    """A route that fails its one-off check sends the run to vmap; a device out of memory
    there is the run's problem (vmap would need more memory) and is raised."""
    x, y = _batch(6)
    model = create_classifier("swin_micro")
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp = make_private(model, opt, record_ids=np.arange(6), expected_batch_size=6, delta=1e-4, epochs=1,
                      max_grad_norm=1.0, noise_multiplier=0.0, accountant="rdp", sampler_seed=0,
                      per_sample_method="auto")
    real = engine_mod.clipped_grad_sum
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the check's call
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "clipped_grad_sum", failing_once)
    idx = dp.sample_batch()
    if isinstance(error, torch.cuda.OutOfMemoryError):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        assert dp.per_sample_method != "vmap"
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)  # stepped again: the check is run then
        assert len(calls) == 3 and dp.per_sample_method == "mixed" and not dp.method_note
    else:
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        assert dp.per_sample_method == "vmap" and "RuntimeError" in dp.method_note


def test_per_sample_losses_of_cross_entropy_skip_vmap_only_when_exact():
    logits, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    fast = per_sample_loss_fn(LOSS)
    one_by_one = torch.stack([LOSS(logits[i : i + 1], y[i : i + 1]) for i in range(5)])
    assert torch.allclose(fast(logits, y), one_by_one, atol=1e-6)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))  # mean divides by the weights
    slow = per_sample_loss_fn(weighted)
    assert torch.allclose(slow(logits, y), torch.stack([weighted(logits[i : i + 1], y[i : i + 1]) for i in range(5)]))


def _bf16_clipper(model, route: str, bf16_gemm: bool):
    """A clipping route for bf16 autocast; `bf16_gemm`: the book-keeping route's clipping
    products as bf16 GEMMs with float32 output (`MixedClipper.bf16_gemm`)."""
    obj = make_route(model, LOSS, torch.bfloat16, route)
    if bf16_gemm:
        obj.bf16_gemm = True
    return obj


def _bf16_route_matches_the_loop(route: str, device: str, bf16_gemm: bool = False) -> None:
    torch.manual_seed(5)
    model = create_classifier("swin_micro").to(device)
    x, y = _batch(6, seed=5)
    x, y = x.to(device), y.to(device)
    records = torch.tensor([0, 1, 1, 2, 3, 3], device=device)
    ref, norms = _loop_clipped_sum(model, x, y, records.cpu(), C=1.0, autocast_dtype=torch.bfloat16)
    C = float(norms.median())
    ref, norms = _loop_clipped_sum(model, x, y, records.cpu(), C=C, autocast_dtype=torch.bfloat16)
    res = clipped_grad_sum(model, LOSS, x, y, max_grad_norm=C, record_ids=records, grad_chunk=4,
                           route=_bf16_clipper(model, route, bf16_gemm))
    # bf16 rounds differently in a batched and a one-sample forward: compare loosely.
    assert torch.allclose(res.norms, norms, rtol=3e-2)
    for name, r in ref.items():
        got = res.grads[name]
        assert got.dtype == torch.float32 and got.device.type == device
        cos = torch.nn.functional.cosine_similarity(got.flatten(), r.flatten(), dim=0)
        assert cos > 0.99, f"{name}: cosine {float(cos):.4f}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("route", ROUTES)
def test_every_route_under_bf16_autocast_on_cuda_matches_the_loop(route):
    _bf16_route_matches_the_loop(route, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("route", ["mixed", "ghost"])
def test_bf16_gemm_clipping_products_on_cuda_match_the_loop(route):
    from mammodp.privacy.per_sample import bf16_f32_gemms

    assert bf16_f32_gemms(torch.device("cuda")), "bf16 GEMMs with float32 output need torch >= 2.8"
    _bf16_route_matches_the_loop(route, "cuda", bf16_gemm=True)


@pytest.mark.parametrize("route,bf16_gemm", [("hooks", False), ("mixed", False), ("ghost", False),
                                             ("mixed", True), ("ghost", True)])
def test_hook_routes_under_bf16_autocast_on_cpu_match_the_loop(route, bf16_gemm):
    # The low-precision products (autocast's dtype) also run under CPU autocast: checked here
    # without a GPU (vmap cannot differentiate CPU bf16 autocast); the CUDA test above covers
    # every route. bf16_gemm on the CPU: its bf16 parts and operands, float32 products.
    _bf16_route_matches_the_loop(route, "cpu", bf16_gemm)


@pytest.mark.parametrize("route", ["hooks", "mixed", "ghost"])
def test_hook_routes_free_the_step_graph_and_activations(route):
    """Regression: the hooks on autograd nodes once reached (through the layer inputs and the
    sink's stored activations) back to those nodes, a reference cycle through C++ that the
    garbage collector cannot break: every step's graph and activations leaked."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = create_classifier("swin_micro", mode="full")
    x, y = _batch(4, seed=3)
    seen: list[weakref.ref] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append(weakref.ref(inp[0])))
               for m in model.modules() if isinstance(m, nn.Linear)]
    clipped_grad_sum(model, LOSS, x, y, max_grad_norm=1.0, method=route)
    for h in handles:
        h.remove()
    gc.collect()
    assert seen and all(r() is None for r in seen), f"{sum(r() is not None for r in seen)} of {len(seen)} alive"


def test_the_recorder_lets_go_of_a_layer_input_once_its_sink_has_it():
    """A layer's input activation must die as soon as backward has passed its layer (autograd
    drops its own copy then): held by the recorder to the end of backward, every MLP hidden
    activation outlived its use, raising peak memory (1.08x -> 1.02x plain at swin_micro) and
    handing later backward kernels cold memory."""
    import weakref

    from mammodp.privacy.grad_sampler import Recorder

    torch.manual_seed(0)
    model = create_classifier("swin_micro", mode="full")
    x, y = _batch(4, seed=3)
    hidden: dict[str, weakref.ref] = {}  # fc2's input: the GELU output, saved by fc2's node only
    alive_later: dict[str, bool] = {}

    def sink(call, g):
        for key, ref in hidden.items():
            alive_later.setdefault(key, ref() is not None)  # at the next layer call backward reaches
        if call.key.endswith("mlp.fc2."):
            hidden[call.key] = weakref.ref(call.a)

    Recorder(model, LOSS, None).run(x, y, sink)
    assert len(alive_later) == 5 and not any(alive_later.values()), alive_later


@pytest.mark.parametrize("was_enabled", [True, False])
def test_the_recorder_pauses_the_cyclic_collector_only_for_its_pass(was_enabled):
    import gc

    from mammodp.privacy.grad_sampler import Recorder

    torch.manual_seed(0)
    model = create_classifier("swin_micro", mode="full")
    x, y = _batch(2, seed=3)
    seen = []

    def sink(call, g):
        seen.append(gc.isenabled())

    def failing(call, g):
        raise RuntimeError("boom")

    before = gc.isenabled()
    (gc.enable if was_enabled else gc.disable)()
    try:
        rec = Recorder(model, LOSS, None)
        rec.run(x, y, sink)
        assert seen and not any(seen)  # paused while the hooks run
        assert gc.isenabled() == was_enabled  # restored after the pass
        with pytest.raises(RuntimeError, match="boom"):
            rec.run(x, y, failing)
        assert gc.isenabled() == was_enabled  # and after a failed one
    finally:
        (gc.enable if before else gc.disable)()


def _clipped_excess(route: str, device: str, autocast_dtype, *, precision: str | None = None, mode: str = "full",
                    per_record: int = 1, grad_chunk: int = 32, outer_autocast: bool = False,
                    preset: str = "swin_micro", bf16_gemm: bool = False) -> float:
    """Largest relative excess over C of single clipped records' contributions (6 records of
    `per_record` samples each, one record per call)."""
    torch.manual_seed(6)
    model = create_classifier(preset, mode=mode).to(device)
    x, y = _batch(6 * per_record, seed=6, size=model.img_size)
    x, y = x.to(device), y.to(device)
    C = 1e-3
    obj = None
    if bf16_gemm:
        obj = make_route(model, LOSS, autocast_dtype, route)
        obj.bf16_gemm = True
    before = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        results = []
        for i in range(6):
            sl = slice(i * per_record, (i + 1) * per_record)
            rec = torch.full((per_record,), 7 + i) if per_record > 1 else None
            with torch.autocast(device, dtype=torch.bfloat16, enabled=outer_autocast):
                results.append(clipped_grad_sum(model, LOSS, x[sl], y[sl], max_grad_norm=C, record_ids=rec,
                                                grad_chunk=grad_chunk, autocast_dtype=autocast_dtype, method=route,
                                                route=obj))
        if precision is not None:
            assert torch.get_float32_matmul_precision() == precision  # the clipping block restored it
    finally:
        torch.set_float32_matmul_precision(before)
    excess = []
    for res in results:
        assert res.n_records == 1 and float(res.norms[0]) > C  # one record, clipped
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in res.grads.values()))
        excess.append(norm / C - 1.0)
    return max(excess)


@pytest.mark.parametrize("case", [
    {},  # one patch a record
    {"per_record": 3},  # patient records: ghost Grams over a record's concatenated tokens
    {"per_record": 3, "grad_chunk": 1},  # a record larger than a pass: the materialising fallback
    {"mode": "frozen_backbone"},  # head-only (the paper's mode)
    {"outer_autocast": True, "autocast_dtype": None},  # the caller's own autocast around the call
], ids=["patch", "patient", "patient-over-chunks", "head-only", "caller-autocast"])
@pytest.mark.parametrize("route", ["hooks", "mixed", "ghost"])
def test_a_clipped_record_adds_at_most_C_under_bf16_autocast(route, case):
    """The sensitivity bound holds in low precision too: a clipped record's contribution to
    the sum has norm <= C up to float32 rounding. Regression: the book-keeping product of a
    ghost layer ran in bf16 (clip factor and the summed product rounded to 8 bits), so a
    record added up to 0.3% more than C (measured here), and the rounding of the whole
    batch's sum was bounded by no single record; a caller's autocast around the step put the
    Grams in bf16 (up to 0.1% over C)."""
    case = {"autocast_dtype": torch.bfloat16, **case}
    excess = _clipped_excess(route, "cpu", **case)
    assert excess <= 1e-5, f"clipped contributions exceed C by up to {excess:.2e}"


@pytest.mark.parametrize("per_record", [1, 3])
@pytest.mark.parametrize("route", ["mixed", "ghost"])
def test_bf16_gemm_passes_clip_with_the_tf32_margin(route, per_record):
    """`MixedClipper.bf16_gemm` (bf16 parts and operands, float32 products; on the CPU by
    float32 copies): a clipped record adds C / (1 + TF32_MARGIN), as on the TF32 path."""
    excess = _clipped_excess(route, "cpu", torch.bfloat16, per_record=per_record, bf16_gemm=True)
    assert excess == pytest.approx(1 / (1 + ghost.TF32_MARGIN) - 1, abs=1e-5)


def test_bf16_products_are_float32_products_of_the_same_values():
    """`per_sample.bf16_product` on the CPU, i.e. its fallback (no bf16 GEMM with float32
    output exists there; the meta device has one, which bench/dp_flops.py counts): bf16
    operands (strided too), a float32 result, the float32 product of their values. The
    CUDA kernel is checked by the `gpu` test below."""
    from mammodp.privacy.per_sample import bf16_f32_gemms, bf16_product

    assert not bf16_f32_gemms(torch.device("cpu")) and bf16_f32_gemms(torch.device("meta"))
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 40, 24, generator=g).bfloat16()
    b = torch.randn(3, 30, 40, generator=g).bfloat16().transpose(1, 2)  # (3, 40, 30), strided
    got = bf16_product(a.transpose(1, 2), b)  # (3, 24, 30)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.bmm(a.transpose(1, 2).float(), b.float()))
    assert torch.equal(bf16_product(a[0].t(), b[0]), got[0])  # matrices
    # the products of bf16 numbers are exact: only the sums round (float32, 40 terms)
    ref = torch.bmm(a.transpose(1, 2).double(), b.double())
    assert float((got.double() - ref).abs().max()) <= 40 * 2**-24 * float(
        torch.bmm(a.transpose(1, 2).double().abs(), b.double().abs()).max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_products_on_cuda_sum_in_float32():
    """On CUDA `bf16_product` is one bf16 GEMM with float32 output: exact products, float32
    sums (not rounded to bf16), at a Gram of Swin-T's widest layer (3072 numbers a token)."""
    from mammodp.privacy.per_sample import bf16_f32_gemms, bf16_product

    assert bf16_f32_gemms(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4, 196, 3072, device="cuda", generator=g).bfloat16()
    got = bf16_product(x, x.transpose(1, 2))  # (4, 196, 196)
    ref = torch.bmm(x.double(), x.double().transpose(1, 2))
    bound = float(torch.bmm(x.double().abs(), x.double().abs().transpose(1, 2)).max())
    err = float((got.double() - ref).abs().max())
    assert got.dtype == torch.float32 and err <= 3072 * 2**-23 * bound, err
    ones = torch.ones(1, 1, 4097, device="cuda", dtype=torch.bfloat16)
    # 4097 is exact in float32 whatever the order of the sums; bf16 would give 4096
    assert bf16_product(ones, ones.transpose(1, 2)).item() == 4097.0


@pytest.mark.parametrize("route", ["hooks", "mixed", "ghost"])
def test_clipping_arithmetic_runs_without_autocast_and_in_full_float32(route, monkeypatch):
    """Inside the clipping block: autocast off and float32 products in IEEE float32, whatever
    the process set (the legacy and the per-backend precision APIs); both restored after.
    (Seen at the clip factors; the TF32 products of autocast runs are checked separately.)"""
    import mammodp.privacy.per_sample as per_sample

    seen = []
    original = per_sample.clip_factors

    def spy(norms, c):
        seen.append((torch.is_autocast_enabled("cpu"), torch.backends.cuda.matmul.fp32_precision,
                     torch.backends.mkldnn.matmul.fp32_precision))
        return original(norms, c)

    monkeypatch.setattr(ghost, "clip_factors", spy)  # mixed / ghost
    monkeypatch.setattr(per_sample, "clip_factors", spy)  # hooks (materialised per-record gradients)
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    torch.manual_seed(0)
    model = create_classifier("swin_micro")
    x, y = _batch(4, seed=0)
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            clipped_grad_sum(model, LOSS, x, y, max_grad_norm=1e-3, method=route)
            assert torch.is_autocast_enabled("cpu")  # the caller's autocast is back
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == (
            "tf32", "bf16")  # restored
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = saved
    assert seen and all(s == (False, "ieee", "ieee") for s in seen), seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("route", ["hooks", "mixed", "ghost"])
def test_a_clipped_record_adds_at_most_C_on_cuda_with_tf32_allowed(route, autocast_dtype):
    # With TF32 allowed process-wide, the Grams and the book-keeping product would round
    # their inputs to 10 bits, each differently: the clipping block switches it off.
    excess = _clipped_excess(route, "cuda", autocast_dtype, precision="high")
    assert excess <= 1e-5, f"clipped contributions exceed C by up to {excess:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("route,bf16_gemm", [("mixed", False), ("hooks", False), ("mixed", True)])
def test_a_clipped_record_adds_at_most_C_at_swin_t_size_under_bf16(route, bf16_gemm):
    # The TF32 products' float32 sums are longest at Swin-T's sizes (3072-wide layers, 196-
    # and 49-token windows of records of two patches): any bias of tensor cores' rounding
    # toward zero shows here first, and must stay inside TF32_MARGIN. The same for the bf16
    # GEMMs with float32 output (`MixedClipper.bf16_gemm`).
    excess = _clipped_excess(route, "cuda", torch.bfloat16, per_record=2, preset="swin_tiny", bf16_gemm=bf16_gemm)
    assert excess <= 1e-5, f"clipped contributions exceed C by up to {excess:.2e}"


def test_the_bf16_split_of_a_float32_tensor_is_exact():
    """`ghost._split_bf16`: three bf16-valued parts whose exact sum is x, across magnitudes
    (what makes the TF32 book-keeping product of a bf16 run exact)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.pow(10.0, torch.empty(20000).uniform_(-25, 30, generator=g))
    # up to bf16's largest number (a clip factor <= 1 times a bf16 value stays below it) and
    # down to 2^-110 (below, the last part falls under float32's normal range)
    x = torch.cat([x, torch.tensor([0.0, 1.0, -1.0, 1 + 2**-23, 3.0e38, -2e-33])])
    parts = ghost._split_bf16(x.clone())
    assert all(p.dtype == torch.float32 and torch.equal(p, p.bfloat16().float()) for p in parts)
    assert torch.equal(sum(p.double() for p in parts), x.double())
    low = ghost._split_bf16(x.clone(), as_bf16=True)  # the same parts as bf16 tensors
    assert all(p.dtype == torch.bfloat16 and torch.equal(p.float(), q) for p, q in zip(low, parts))
    two = parts[0].double() + parts[1].double()
    assert not torch.equal(two, x.double())  # the third part is needed (the test can fail)
    assert _is_tf32_number(parts[2]) and not _is_tf32_number(x)


class _ProductSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Matrix products run while CUDA's float32 matmul precision is TF32: their operands."""

    OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "mv", "addmv", "addmv_", "matmul"}

    def __init__(self):
        super().__init__()
        self.tf32_operands: list[torch.Tensor] = []
        self.tf32_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (func.overloadpacket.__name__ in self.OPS
                and torch.backends.cuda.matmul.fp32_precision == "tf32"):
            self.tf32_calls += 1
            factors = args[1:] if func.overloadpacket.__name__.startswith(("add", "badd")) else args  # not the sum
            self.tf32_operands += [a for a in factors if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def _is_tf32_number(t: torch.Tensor) -> bool:
    """Float32 values with at most 11 significant bits (TF32's 10 stored + 1): low 13 bits 0."""
    return t.dtype == torch.float32 and bool(((t.contiguous().view(torch.int32) & 0x1FFF) == 0).all())


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_record", [1, 3])
@pytest.mark.parametrize("route", ["hooks", "mixed", "ghost"])
def test_tf32_clipping_products_take_only_tf32_numbers(route, per_record, low):
    """Under bf16 / fp16 autocast the ghost layers' Grams and book-keeping products and the
    hooks route's per-sample products run with TF32 allowed: exact only if every operand is a
    TF32 number already, which this checks for every such product. A float32 run allows
    TF32 nowhere."""
    torch.manual_seed(8)
    model = create_classifier("swin_micro")
    x, y = _batch(6, seed=8)
    rec = torch.arange(6) // per_record
    saved = torch.backends.cuda.matmul.fp32_precision
    for dtype in (low, None):
        spy = _ProductSpy()
        with spy:
            clipped_grad_sum(model, LOSS, x, y, max_grad_norm=1e-3, record_ids=rec, grad_chunk=6,
                             autocast_dtype=dtype, method=route)
        assert torch.backends.cuda.matmul.fp32_precision == saved  # restored
        if dtype is None:
            assert spy.tf32_calls == 0
            continue
        assert spy.tf32_calls > 0
        for t in spy.tf32_operands:
            assert _is_tf32_number(t), "a TF32 operand would be rounded"


@pytest.mark.parametrize("route", ["mixed", "ghost"])
def test_bf16_gemm_switch_multiplies_bf16_numbers_only(route, monkeypatch):
    """`MixedClipper.bf16_gemm` under bf16 autocast: every clipping product of the ghost layers
    goes through `bf16_product` with bf16 operands (the CPU then multiplies their float32
    copies with TF32 allowed: TF32 numbers only, checked by the spy); patient records."""
    from mammodp.privacy import per_sample

    torch.manual_seed(8)
    model = create_classifier("swin_micro")
    x, y = _batch(6, seed=8)
    seen = []
    original = per_sample.bf16_product

    def spy_product(a, b):
        seen.append((a.dtype, b.dtype))
        return original(a, b)

    spy = _ProductSpy()
    route = _bf16_clipper(model, route, bf16_gemm=True)
    monkeypatch.setattr(ghost, "bf16_product", spy_product)
    with spy:
        clipped_grad_sum(model, LOSS, x, y, max_grad_norm=1e-3, record_ids=torch.arange(6) // 3, route=route)
    n_ghost = sum(v == "ghost" for v in route.choices.values())
    # per ghost layer: two Grams (a one-token layer takes none) and three book-keeping products
    assert n_ghost > 0 and len(seen) >= 3 * n_ghost
    assert all(d == (torch.bfloat16, torch.bfloat16) for d in seen)
    assert spy.tf32_calls >= len(seen)
    assert all(_is_tf32_number(t) for t in spy.tf32_operands)


def test_the_ieee_switch_of_the_bookkeeping_route_allows_tf32_nowhere():
    """`MixedClipper.tf32 = False` (the benchmarks' A/B): the clipping products of a bf16 run
    in IEEE float32 again, and a clipped record still adds at most C."""
    torch.manual_seed(8)
    model = create_classifier("swin_micro")
    x, y = _batch(6, seed=8)
    route = MixedClipper(model, LOSS, torch.bfloat16, route="ghost")
    route.tf32 = False
    spy = _ProductSpy()
    with spy:
        res = clipped_grad_sum(model, LOSS, x[:1], y[:1], max_grad_norm=1e-3, route=route)
    assert spy.tf32_calls == 0
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in res.grads.values()))
    assert float(res.norms[0]) > 1e-3 and norm <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("route", ["mixed", "ghost", "hooks"])
def test_tf32_passes_clip_with_a_margin_and_ieee_passes_to_C(route):
    """A pass whose ghost layers ran on TF32 tensor cores clips to C / (1 + TF32_MARGIN)
    (tensor cores may round their float32 sums toward zero); float32 runs, the IEEE switch
    and the hooks route (whose norm is taken of the very tensor it adds) clip to C."""
    bf16 = _clipped_excess(route, "cpu", torch.bfloat16)
    f32 = _clipped_excess(route, "cpu", None)
    assert abs(f32) <= 1e-5
    if route == "hooks":
        assert abs(bf16) <= 1e-5
    else:
        assert bf16 == pytest.approx(1 / (1 + ghost.TF32_MARGIN) - 1, abs=1e-5)


def test_row_norms_stay_accurate_over_long_rows():
    """torch's CPU vector_norm sums a long row in a few float32 running sums (4e-5 relative at
    2.4M numbers, measured); `row_norms` norms chunks, then the chunk norms."""
    from mammodp.privacy.per_sample import row_norms

    g = torch.Generator().manual_seed(0)
    for n in (7, 4096, 4097, 3_000_001):
        v = torch.rand(2, n, generator=g) + 0.5  # one sign: no cancellation to hide behind
        ref = v.double().norm(dim=1)
        got = row_norms(v)
        assert got.dtype == torch.float32
        assert float(((got.double() - ref) / ref).abs().max()) < 1e-6, n
    strided = torch.rand(3, 2 * 5000, generator=g)[:, ::2]  # a non-contiguous row layout
    assert torch.allclose(row_norms(strided).double(), strided.double().norm(dim=1), rtol=1e-6)


@pytest.mark.parametrize("route", ["hooks", "mixed"])
def test_a_clipped_record_adds_at_most_C_at_swin_t_size_on_cpu(route):
    """At Swin-T's size (27.8M parameters, a 2.4M-number layer) a record's norm summed in
    float32 by torch's CPU vector_norm came out 2.1e-5 too small: the hooks route's clipped
    records added 2.1e-5 more than C. Records of two patches, float32."""
    excess = _clipped_excess(route, "cpu", None, per_record=2, preset="swin_tiny")
    assert excess <= 1e-5, f"clipped contributions exceed C by up to {excess:.2e}"


@functools.cache
def _overhead_bench():
    """bench/dp_overhead.py as a module (its CUDA LayerNorm policy and CPU memory peak)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "dp_overhead", Path(__file__).resolve().parents[2] / "bench" / "dp_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _cuda_layer_norm_policy(model: nn.Module) -> nn.Module:
    """CUDA autocast's policy on the CPU: LayerNorms in float32 (CPU autocast runs them in
    their input's dtype), so the Linear layers after them take float32 inputs that autocast
    casts to bf16 -- as in every bf16 run on a GPU."""
    _overhead_bench()._layernorm_fp32(model)
    return model


def _peak_bytes(fn) -> int:
    return _overhead_bench()._cpu_peak_bytes(fn)


@pytest.mark.parametrize("route", ["hooks", "mixed"])
def test_under_autocast_the_recorder_holds_what_the_layers_multiplied(route, monkeypatch):
    """With LayerNorms in float32 under bf16 autocast (CUDA's policy), the recorder once held
    each Linear's float32 input to backward beside autocast's bf16 copy (+0.18x plain's peak
    memory at swin_micro, +0.15x at Swin-T). Now the input is cast before the call as autocast
    would: every recorded Linear / patchifier input is bf16, the clipped sums still equal the
    per-sample loop's (patient records), and the pass's peak memory drops."""
    from mammodp.privacy import grad_sampler

    torch.manual_seed(5)
    model = _cuda_layer_norm_policy(create_classifier("swin_micro"))
    x, y = _batch(6, seed=5)
    records = torch.tensor([0, 1, 1, 2, 3, 3])
    ref, norms = _loop_clipped_sum(model, x, y, records, C=1.0, autocast_dtype=torch.bfloat16)
    C = float(norms.median())
    ref, norms = _loop_clipped_sum(model, x, y, records, C=C, autocast_dtype=torch.bfloat16)
    seen = []
    run = grad_sampler.Recorder.run

    def spying_run(self, x, y, sink):
        def spy(call, g):
            if call.kind in ("linear", "patchify"):
                seen.append(call.a.dtype)
            sink(call, g)
        return run(self, x, y, spy)

    monkeypatch.setattr(grad_sampler.Recorder, "run", spying_run)
    res = clipped_grad_sum(model, LOSS, x, y, max_grad_norm=C, record_ids=records, grad_chunk=6,
                           autocast_dtype=torch.bfloat16, method=route)
    assert seen and all(d == torch.bfloat16 for d in seen), set(seen)
    assert torch.allclose(res.norms, norms, rtol=3e-2)
    for name, r in ref.items():
        cos = torch.nn.functional.cosine_similarity(res.grads[name].flatten(), r.flatten(), dim=0)
        assert cos > 0.99, f"{name}: cosine {float(cos):.4f}"
    monkeypatch.setattr(grad_sampler.Recorder, "run", run)

    def step():
        clipped_grad_sum(model, LOSS, x, y, max_grad_norm=C, record_ids=records, grad_chunk=6,
                         autocast_dtype=torch.bfloat16, method=route)

    now = _peak_bytes(step)
    monkeypatch.setattr(grad_sampler, "_cast_input", lambda args, kwargs: (args, kwargs))  # as before
    before = _peak_bytes(step)
    assert now < 0.95 * before, (now, before)


class _Float32Linear(nn.Linear):
    """A Linear that runs in float32 whatever the autocast around it (its own forward)."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("route", ["hooks", "mixed"])
def test_the_recorder_casts_no_input_of_a_layer_with_its_own_forward(route, monkeypatch):
    """The recorder's autocast cast is for torch's own Linear / Conv2d forward only: a
    subclass that switches autocast off keeps its float32 input (cast, F.linear would fail
    on bf16 input and float32 weights), and its gradients agree with the per-sample loop."""
    from mammodp.privacy import grad_sampler

    torch.manual_seed(5)
    model = _cuda_layer_norm_policy(create_classifier("swin_micro"))
    old = model.head[0]
    model.head[0] = _Float32Linear(old.in_features, old.out_features)
    model.head[0].load_state_dict(old.state_dict())
    x, y = _batch(4, seed=5)
    ref, norms = _loop_clipped_sum(model, x, y, torch.arange(4), C=math.inf, autocast_dtype=torch.bfloat16)
    seen = {}
    run = grad_sampler.Recorder.run

    def spying_run(self, x, y, sink):
        def spy(call, g):
            if call.kind == "linear":
                seen[call.key] = call.a.dtype
            sink(call, g)
        return run(self, x, y, spy)

    monkeypatch.setattr(grad_sampler.Recorder, "run", spying_run)
    res = clipped_grad_sum(model, LOSS, x, y, max_grad_norm=math.inf, autocast_dtype=torch.bfloat16, method=route)
    assert seen["head.0."] == torch.float32 and seen["head.2."] == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(res.grads["head.0.weight"].flatten(),
                                                ref["head.0.weight"].flatten(), dim=0)
    assert cos > 0.99


def test_overhead_bench_times_the_host_part_of_each_step():
    """dp_overhead's timing loop reports, beside the wall time, the time until a step returned
    (on CUDA: its kernels queued), which `--device-time` compares with the device's busy time."""
    import time

    bench = _overhead_bench()

    def slow():
        time.sleep(0.01)

    wall, proc, host = bench._time_interleaved({"slow": slow}, 4, torch.device("cpu"), block=2)
    assert set(wall) == set(proc) == set(host) == {"slow"}
    assert 0.009 < host["slow"] <= wall["slow"] and proc["slow"] < 0.005  # sleeping takes no CPU time


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overhead_bench_measures_device_busy_time_on_cuda():
    bench = _overhead_bench()
    x = torch.randn(2048, 2048, device="cuda")

    def step():
        for _ in range(8):
            x @ x

    wall, _, host = bench._time_interleaved({"mm": step}, 4, torch.device("cuda"), block=2)
    busy = bench._device_busy({"mm": step}, torch.device("cuda"))
    assert 0 < busy["mm"] <= 1.2 * wall["mm"] and host["mm"] <= wall["mm"]

    # A host-bound step inside an optimizer step (a record_function range, which the profiler
    # also shows as a device event spanning its kernels and the gaps between): busy is the
    # kernels' time only, far below the wall time.
    import time

    p = torch.nn.Parameter(torch.zeros(16, device="cuda"))
    opt = torch.optim.SGD([p], lr=0.1)

    def host_bound():
        p.grad = torch.ones_like(p)
        with torch.profiler.record_function("annotated"):
            for _ in range(5):
                x.add_(1.0)
                time.sleep(0.002)
        opt.step()

    wall, _, _ = bench._time_interleaved({"h": host_bound}, 4, torch.device("cuda"), block=2)
    busy = bench._device_busy({"h": host_bound}, torch.device("cuda"))
    assert 0 < busy["h"] < 0.5 * wall["h"], (busy, wall)


def test_overhead_bench_counts_device_work_not_annotated_ranges():
    """The profiler lists a record_function range (every optimizer step) also as a device
    event over its kernels and gaps: the busy time and kernel count leave it out."""
    from types import SimpleNamespace

    bench = _overhead_bench()
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(device_type=cuda, is_user_annotation=False, name="gemm"),
              SimpleNamespace(device_type=cuda, is_user_annotation=True, name="Optimizer.step#SGD.step"),
              SimpleNamespace(device_type=cpu, is_user_annotation=False, name="aten::mm"),
              SimpleNamespace(device_type=cuda, name="memcpy")]  # averaged events may lack the flag
    assert [e.name for e in bench._device_events(events)] == ["gemm", "memcpy"]
