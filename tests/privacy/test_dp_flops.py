"""bench/dp_flops.py: device work of a step counted on the meta device (no GPU needed); and
the property it exists to show: under autocast no clipping product runs in IEEE float32."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mammodp.privacy import ghost, grad_sampler, per_sample

_PATH = Path(__file__).resolve().parents[2] / "bench" / "dp_flops.py"


def _bench():
    spec = importlib.util.spec_from_file_location("dp_flops", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flop_count_of_a_linear_layer_matches_the_formula():
    bench = _bench()
    lin = torch.nn.Linear(6, 5).to("meta")
    x = torch.empty(4, 6, device="meta", requires_grad=True)
    c = bench.Counter()
    with c:
        lin(x).sum().backward()
    # forward 4x6x5, input gradient 4x5x6, weight gradient 5x4x6: 2 flops a multiply-add each
    assert c.flops["model"] == 3 * 2 * 4 * 6 * 5
    assert c.flops["IEEE"] == c.flops["model"]  # float32, TF32 not allowed


def test_counts_split_the_dp_step_and_bf16_runs_clip_without_ieee_float32_products():
    bench = _bench()
    run, exact = grad_sampler.Recorder.run, per_sample.exact_arithmetic
    f32 = bench.count("swin_micro", 8, 8, ("mixed", "hooks"), "patient")
    bf16 = bench.count("swin_micro", 8, 8, ("mixed", "hooks"), "patient", torch.bfloat16)
    # the tagging is undone
    assert (grad_sampler.Recorder.run, per_sample.exact_arithmetic, ghost.exact_arithmetic) == (run, exact, exact)
    plain, mixed, hooks = f32["plain"], f32["mixed"], f32["hooks"]
    assert plain.flops["rules"] == plain.flops["clip"] == 0
    # DP's own pass has no summed weight gradients: less model work than plain
    assert 0 < mixed.flops["model"] < plain.flops["model"]
    assert mixed.flops["model"] == hooks.flops["model"]
    assert mixed.flops["clip"] > 0 and hooks.flops["rules"] > 0  # ghost norms + book-keeping; materialised
    assert mixed.flops["TF32"] == hooks.flops["TF32"] == 0  # float32 runs: IEEE only
    for name in ("mixed", "hooks"):
        c = bf16[name]
        assert c.flops["TF32"] > 0
        # only the small clipped-sum products of materialised gradients stay in IEEE float32
        assert c.flops["IEEE"] < 0.01 * bf16["plain"].flops["model"], name
    assert bf16["mixed"].written["model"] < f32["mixed"].written["model"]  # bf16 activations


def test_bf16_gemm_switch_moves_the_clipping_products_off_float32_copies():
    """`MixedClipper.bf16_gemm` (route `mixed-bf16`): the ghost layers' Grams and book-keeping
    products become bf16 GEMMs with float32 output (counted on the meta device, which has
    them as CUDA does): no TF32 or IEEE float32 clipping products, the same GEMM work, fewer
    bytes written (no float32 copies of bf16 operands)."""
    bench = _bench()
    c = bench.count("swin_micro", 8, 8, ("mixed", "mixed-bf16"), "patient", torch.bfloat16)
    tf32, low = c["mixed"], c["mixed-bf16"]
    assert low.flops["BF16-F32"] > 0 and low.flops["TF32"] == 0 and tf32.flops["BF16-F32"] == 0
    # the same products
    assert abs(low.flops["BF16-F32"] - tf32.flops["TF32"]) <= 2 and tf32.flops["TF32"] > 0.99 * tf32.flops["clip"]
    assert low.written["clip"] < tf32.written["clip"]


def test_the_dp_count_accumulates_as_the_engine_does():
    """The engine accumulates every step into one flat buffer whose views it made once: the
    count must not charge the step a fill per parameter (it did: 175 calls at Swin-T), and an
    index_add into that buffer writes its source, not the whole buffer."""
    bench = _bench()
    c = bench.count("swin_micro", 4, 4, ("mixed",), "patch")["mixed"]
    n_params = len(per_sample.trainable_named_parameters(
        bench.create_classifier("swin_micro", mode="full")))
    fills = sum(v for (phase, op), v in c.ops.items() if op in ("aten.zeros_like", "aten.zeros", "aten.zero_"))
    assert fills < n_params // 4, fills
    base = torch.zeros(1000, device="meta")
    src, idx = torch.ones(10, device="meta"), torch.arange(10, device="meta")
    k = bench.Counter()
    with k:
        base.index_add_(0, idx, src)
    assert k.written["model"] == 10 * 4


def test_a_route_is_counted_at_its_steady_step():
    """What a route builds once a run (the small gradients' positions in the engine's flat
    buffer, flat views of it) is not every step's work: the count is of a step after the
    first (it was of the first: 141 calls too many at Swin-T)."""
    bench = _bench()
    c = bench.count("swin_micro", 4, 4, ("mixed",), "patch")["mixed"]
    assert c.ops.get(("clip", "aten.arange"), 0) == 0, dict(c.ops)
    assert c.ops.get(("clip", "aten.mv"), 0) == 1  # the small gradients' clipped sum: the step was counted
    assert c.ops.get(("clip", "aten.index_add_"), 0) == 1


def test_kernels_are_the_calls_that_do_device_work():
    """Views, bare allocations and calls on host tensors only launch nothing on a GPU; the
    rest are counted as kernels (operator calls count them all)."""
    bench = _bench()
    x = torch.empty(4, 6, device="meta")
    k = bench.Counter()
    with k:
        x.view(-1), x.t(), x[1:], x.unsqueeze(0), x.reshape(24)  # views
        torch.empty(3, device="meta"), torch.empty_like(x)  # no fill
        torch.arange(10).sum()  # the host's
        torch.ops.aten._unsafe_view(x, (24,))
        x.t().reshape(24)  # a copy
        x + 1, torch.zeros(3, device="meta")  # an elementwise kernel, a fill
    assert k.kernels["model"] == 3, dict(k.ops)
    assert k.calls["model"] > 3


def test_the_clipping_block_launches_a_fixed_few_kernels_beside_its_layers():
    """Swin-T's record norms are summed once (no add per ghost layer), and every gradient but
    the materialised weights (biases, LayerNorms, bias tables up to 4056 numbers a record)
    joins the one norm and product: one product per materialised weight, none per bias."""
    bench = _bench()
    c = bench.count("swin_tiny", 2, 2, ("mixed",), "patch")["mixed"]
    assert c.ops.get(("clip", "aten.add_"), 0) == 0, dict(c.ops)
    products = c.ops.get(("clip", "aten.addmv_"), 0)
    materialised = c.ops.get(("rules", "aten.bmm"), 0)  # a materialised weight's per-sample product
    assert materialised > 0 and products == materialised, (products, materialised)
    assert c.ops.get(("clip", "aten.mv"), 0) == 1  # the joined ones
