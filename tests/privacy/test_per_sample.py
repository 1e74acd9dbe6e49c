"""Per-sample / per-record gradients with torch.func equal a loop of ordinary autograd."""

from __future__ import annotations

import pytest
import torch

from mammodp.models.swin import create_classifier, trainable_parameters
from mammodp.privacy.per_sample import (
    clip_factors,
    clipped_grad_sum,
    per_sample_gradients,
    record_norms,
    trainable_named_parameters,
)

LOSS = torch.nn.CrossEntropyLoss(label_smoothing=0.1)


def _batch(n: int, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g)


def _loop_grads(model, x, y) -> list[dict[str, torch.Tensor]]:
    """One ordinary backward per sample."""
    named = trainable_named_parameters(model)
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(LOSS(model(x[i : i + 1]), y[i : i + 1]), list(named.values()))
        out.append(dict(zip(named, grads)))
    return out


def _assert_close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    scale = b.abs().max().clamp(min=1e-6)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(scale)), f"{name}: max diff {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("method", ["vmap", "hooks"])
@pytest.mark.parametrize("mode", ["full", "frozen_backbone"])
def test_per_sample_gradients_equal_a_loop(mode, method):
    torch.manual_seed(0)
    model = create_classifier("swin_micro", mode=mode).train()
    x, y = _batch(5, size=48)  # resize inside the model is differentiated per sample too
    grads, keys = per_sample_gradients(model, LOSS, x, y, grad_chunk=2, method=method)  # 3 chunks
    loop = _loop_grads(model, x, y)
    assert keys.tolist() == list(range(5))
    assert set(grads) == set(trainable_named_parameters(model))
    if mode == "frozen_backbone":
        assert all(name.startswith("head.") for name in grads)
    else:
        assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table" in grads
    for name, g in grads.items():
        assert g.shape == (5, *dict(model.named_parameters())[name].shape)
        for i in range(5):
            _assert_close(g[i], loop[i][name], f"{name}[{i}]")


@pytest.mark.parametrize("method", ["vmap", "hooks"])
@pytest.mark.parametrize("mode", ["full", "frozen_backbone"])
def test_per_record_gradients_sum_each_patients_samples(mode, method):
    torch.manual_seed(1)
    model = create_classifier("swin_micro", mode=mode)
    x, y = _batch(6, seed=1)
    record_ids = torch.tensor([7, 3, 7, 5, 3, 7])  # unsorted; patient 7 has 3 patches
    # grad_chunk=2 < patient 7's 3 patches: its gradient is accumulated across chunks.
    grads, keys = per_sample_gradients(model, LOSS, x, y, record_ids=record_ids, grad_chunk=2, method=method)
    loop = _loop_grads(model, x, y)
    assert keys.tolist() == [3, 5, 7]
    for r, key in enumerate(keys.tolist()):
        members = [i for i in range(6) if record_ids[i] == key]
        for name, g in grads.items():
            _assert_close(g[r], sum(loop[i][name] for i in members), f"{name} record {key}")


@pytest.mark.parametrize("method", ["vmap", "hooks", "mixed", "ghost"])
def test_clipped_sum_equals_clipping_the_loop_and_bounds_each_record(method):
    torch.manual_seed(2)
    model = create_classifier("swin_micro")
    x, y = _batch(6, seed=2)
    record_ids = torch.tensor([0, 1, 1, 2, 3, 3])
    loop = _loop_grads(model, x, y)
    names = list(trainable_named_parameters(model))
    per_record = {n: torch.stack([loop[0][n], loop[1][n] + loop[2][n], loop[3][n], loop[4][n] + loop[5][n]])
                  for n in names}
    norms = record_norms(per_record)
    C = float(norms.median())  # half the records are clipped, half are not
    assert (norms > C).any() and (norms <= C).any()
    res = clipped_grad_sum(model, LOSS, x, y, max_grad_norm=C, record_ids=record_ids, grad_chunk=3, method=method)
    f = clip_factors(norms, C)
    assert res.n_records == 4 and res.n_samples == 6
    assert torch.allclose(res.norms, norms, rtol=1e-4)
    for n in names:
        expected = (f.view(-1, *[1] * (per_record[n].dim() - 1)) * per_record[n]).sum(0)
        _assert_close(res.grads[n], expected, n)
    # each record alone contributes a gradient of norm <= C
    for r, members in enumerate([[0], [1, 2], [3], [4, 5]]):
        idx = torch.tensor(members)
        one = clipped_grad_sum(model, LOSS, x[idx], y[idx], max_grad_norm=C, record_ids=record_ids[idx],
                               method=method)
        total = torch.sqrt(sum((g**2).sum() for g in one.grads.values()))
        assert total <= C * (1 + 1e-4), f"record {r}: {total} > {C}"
        if norms[r] > C:
            assert total == pytest.approx(C, rel=1e-3)


@pytest.mark.parametrize("method", ["vmap", "mixed"])
def test_clipping_with_an_infinite_norm_is_the_plain_sum(method):
    torch.manual_seed(3)
    model = create_classifier("swin_micro")
    x, y = _batch(4, seed=3)
    res = clipped_grad_sum(model, LOSS, x, y, max_grad_norm=float("inf"), grad_chunk=3, method=method)
    params = trainable_parameters(model)
    plain = torch.autograd.grad(LOSS(model(x), y) * 4, params)
    for (name, g), p in zip(res.grads.items(), plain):
        _assert_close(g, p, name)
    with torch.no_grad():
        assert res.loss_sum == pytest.approx(float(LOSS(model(x), y)) * 4, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_inside_vmap_is_close_to_fp32_on_cuda():
    torch.manual_seed(4)
    model = create_classifier("swin_micro").cuda()
    x, y = _batch(4, seed=4)
    x, y = x.cuda(), y.cuda()
    ref, _ = per_sample_gradients(model, LOSS, x, y)
    amp, _ = per_sample_gradients(model, LOSS, x, y, autocast_dtype=torch.bfloat16)
    for name in ref:
        cos = torch.nn.functional.cosine_similarity(ref[name].flatten(1), amp[name].flatten(1), dim=1)
        assert amp[name].dtype == torch.float32
        assert (cos > 0.95).all(), f"{name}: {cos}"
    loop = _loop_grads(model, x, y)
    hooks, _ = per_sample_gradients(model, LOSS, x, y, method="hooks")  # CUDA attention kernels
    for name in ref:
        for i in range(4):
            assert torch.allclose(ref[name][i], loop[i][name], rtol=1e-3, atol=1e-5), name
            assert torch.allclose(hooks[name][i], loop[i][name], rtol=1e-3, atol=1e-5), name
