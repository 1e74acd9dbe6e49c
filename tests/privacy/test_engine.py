"""The DP-SGD engine: a private step with no noise and no clipping is a plain step; noise,
normalisation, accounting, Poisson batches and resume behave as DP-SGD requires."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from mammodp.errors import ConfigError, PrivacyError
from mammodp.models.swin import create_classifier, trainable_parameters
from mammodp.privacy import make_private
from mammodp.privacy.per_sample import clipped_grad_sum

LOSS = torch.nn.CrossEntropyLoss(label_smoothing=0.1)


def _data(n: int, seed: int = 0, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g)


def _setup(mode: str = "full", seed: int = 0, lr: float = 1e-3):
    torch.manual_seed(seed)
    model = create_classifier("swin_micro", mode=mode)
    return model, torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=1e-8)


def _engine(model, opt, records, **kw):
    args = dict(record_ids=records, expected_batch_size=len(np.unique(records)), delta=1e-4, epochs=1,
                max_grad_norm=math.inf, noise_multiplier=0.0, accountant="rdp", privacy_unit="patch",
                sampler_seed=0, grad_chunk=3, physical_batch_size=4, per_sample_method="hooks")
    args.update(kw)
    return make_private(model, opt, **args)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("mode", "method"), [("full", "auto"), ("full", "vmap"), ("frozen_backbone", "auto")])
def test_no_noise_no_clipping_equals_a_plain_sgd_step(mode, method):
    x, y = _data(6)
    model, _ = _setup(mode)
    ref_model = copy.deepcopy(model)
    # SGD with momentum: AdamW divides by sqrt(v) and turns 1e-12 rounding in near-zero
    # gradient entries into full-size updates, so it cannot be compared entry by entry.
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(trainable_parameters(ref_model), lr=0.1, momentum=0.9)
    dp = _engine(model, opt, np.arange(6), per_sample_method=method)  # q = 1: the batch is the whole set
    for _ in range(2):
        idx = dp.sample_batch()
        assert sorted(idx.tolist()) == list(range(6))
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        ref_opt.zero_grad()
        LOSS(ref_model(x), y).backward()  # mean over the batch = sum / E with E = 6
        for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
            if p.requires_grad:
                assert torch.allclose(p.grad, r.grad, rtol=1e-4, atol=1e-6 * float(r.grad.abs().max())), name
            else:
                assert p.grad is None and r.grad is None
        opt.step()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert dp.summary()["epsilon"] == math.inf  # sigma = 0 gives no privacy, and says so
    assert dp.summary()["per_sample_method"] == ("vmap" if method == "vmap" else "mixed")


@pytest.mark.parametrize("set_to_none", [True, False])
def test_each_step_rewrites_grad_whatever_the_caller_zeroed(set_to_none):
    # The engine writes every step's noisy mean into one buffer kept for the run, whose views
    # are the `.grad` tensors: a step must replace, never add to, what the last one left there.
    x1, y1 = _data(6, seed=3)
    x2, y2 = _data(6, seed=4)
    model, _ = _setup()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp = _engine(model, opt, np.arange(6), per_sample_method="auto")
    idx = dp.sample_batch()
    dp.step(x1[idx], y1[idx], LOSS, record_idx=idx)
    first = {n: p.grad for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=set_to_none)
    idx = dp.sample_batch()
    dp.step(x2[idx], y2[idx], LOSS, record_idx=idx)
    LOSS(ref_model(x2), y2).backward()
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        assert p.grad is first[name]  # the same view, rewritten in place
        assert torch.allclose(p.grad, r.grad, rtol=1e-4, atol=1e-6 * float(r.grad.abs().max())), name


def test_the_run_buffer_never_hands_out_a_stale_gradient():
    # Steps with and without public samples alternate (the public ones get fresh tensors, the
    # private ones the run's buffer), and a reduce hook that rebinds the entries it is given
    # must not rebind the run's views: every step's .grad is that step's own.
    batches = [_data(6, seed=s) for s in (5, 6, 7, 8)]
    xp, yp = _data(3, seed=9)
    model, _ = _setup()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp = _engine(model, opt, np.arange(6), per_sample_method="auto")

    def rebinding_reduce(grads, stats):  # a one-rank reduce that builds new tensors in place of the given
        for name in list(grads):
            grads[name] = grads[name].clone()
        return grads, stats

    for step, (x, y) in enumerate(batches):
        if step == 2:
            dp.reduce = rebinding_reduce
        public = (xp, yp) if step == 1 else None
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], LOSS, record_idx=idx, public=public)
        ref_model.zero_grad()
        if public is None:
            LOSS(ref_model(x), y).backward()
        else:
            LOSS(ref_model(torch.cat([x, xp])), torch.cat([y, yp])).backward()
        for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
            err = float((p.grad - r.grad).abs().max() / r.grad.abs().max())  # relative to the largest entry
            assert err < 1e-4, (step, name, err)


@pytest.mark.parametrize("mode", ["full", "frozen_backbone"])
def test_between_steps_the_engine_holds_no_buffer_memory_its_caller_let_go(mode, monkeypatch):
    """The clipped sums get memory when the step's clipping first writes and give it back
    when they are the noisy gradient; the noisy gradient (`.grad`'s views) gives it back when a
    step begins and no `.grad` holds it (zero_grad(set_to_none=True)): neither is on the memory
    peak of the step's forward / backward (head-only: the frozen backbone's forward, where
    they made it 1.0025x Opacus'). Kept while the caller keeps `.grad` (set_to_none=False)."""
    from mammodp.privacy import grad_sampler

    x, y = _data(6, seed=3)
    model, _ = _setup(mode)
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp = _engine(model, opt, np.arange(6), per_sample_method="mixed", grad_chunk=6, physical_batch_size=6)
    held = []  # at each step's forward (one pass a step)
    run = grad_sampler.Recorder.run

    def spying_run(self, *args):
        held.append([t.untyped_storage().nbytes() for t in (dp._flat, dp._grad_flat) if t is not None])
        return run(self, *args)

    monkeypatch.setattr(grad_sampler.Recorder, "run", spying_run)
    for set_to_none in (True, True, False, False):
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        assert dp._flat.untyped_storage().nbytes() == 0  # the sums are the gradient now
        ref_model.zero_grad()
        LOSS(ref_model(x), y).backward()
        for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
            if p.requires_grad:  # relative to the largest entry
                assert float((p.grad - r.grad).abs().max() / r.grad.abs().max()) < 1e-4, name
        opt.zero_grad(set_to_none=set_to_none)
    # forward of step 1: the sums' views made, without memory, no gradient buffer yet; steps
    # 2-3: the caller let go of .grad (set_to_none); step 4: it kept .grad (zeroed in place)
    assert held == [[0], [0, 0], [0, 0], [0, dp._grad_flat.numel() * 4]]


def test_a_gradient_shared_with_numpy_keeps_its_memory_and_the_run_goes_on():
    """`.numpy()` on a CPU tensor makes its storage unresizable: the run's gradient buffer then
    keeps its memory (it cannot be given back), and every later step is still right."""
    x, y = _data(6, seed=3)
    model, _ = _setup()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp = _engine(model, opt, np.arange(6), per_sample_method="mixed")
    for _ in range(3):
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        norms = [np.linalg.norm(p.grad.numpy()) for p in model.parameters()]  # a logging line
        assert all(np.isfinite(norms))
        opt.zero_grad(set_to_none=True)
    assert dp._grad_flat.untyped_storage().nbytes() > 0
    idx = dp.sample_batch()
    dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    LOSS(ref_model(x[idx]), y[idx]).backward()
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        assert float((p.grad - r.grad).abs().max() / r.grad.abs().max()) < 1e-4, name


def test_an_interrupted_step_leaves_nothing_in_the_next_one(monkeypatch):
    """A step that fails after its clipping wrote part of the sums (its second physical chunk
    here) leaves them in the buffer: the next step must start from zero; and a `.grad` a caller
    kept from the step before is not left without memory."""
    from mammodp.privacy import engine as engine_mod

    x, y = _data(6, seed=3)
    model, _ = _setup()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    dp = _engine(model, opt, np.arange(6), per_sample_method="hooks")  # physical chunks of 4: two
    calls = []
    real = engine_mod.clipped_grad_sum

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the second step's second chunk
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "clipped_grad_sum", failing_second)
    idx = dp.sample_batch()
    dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    kept = [p.grad for p in model.parameters()]  # references a caller kept past the step
    opt.zero_grad(set_to_none=True)  # the engine may give the gradient's memory back
    idx = dp.sample_batch()
    with pytest.raises(RuntimeError, match="interrupted"):
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    assert dp._flat.untyped_storage().nbytes() > 0 and float(dp._flat.abs().sum()) > 0  # partial sums
    assert all(k.untyped_storage().nbytes() > 0 for k in kept)  # memory again, not a dangling view
    monkeypatch.setattr(engine_mod, "clipped_grad_sum", real)
    dp.step(x[idx], y[idx], LOSS, record_idx=idx)  # the same batch, again
    LOSS(ref_model(x[idx]), y[idx]).backward()
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        assert float((p.grad - r.grad).abs().max() / r.grad.abs().max()) < 1e-4, name  # not twice a chunk


def test_public_samples_mix_in_like_a_plain_step_on_the_union_batch():
    x, y = _data(6)
    xp, yp = _data(3, seed=9)
    model, _ = _setup()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    ref_opt = torch.optim.SGD(trainable_parameters(ref_model), lr=0.1)
    dp = _engine(model, opt, np.arange(6))
    idx = dp.sample_batch()
    dp.step(x[idx], y[idx], LOSS, record_idx=idx, public=(xp, yp))
    opt.step()
    LOSS(ref_model(torch.cat([x, xp])), torch.cat([y, yp])).backward()
    ref_opt.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert dp.accountant.steps == 1  # public samples are not records: one step, 6 records
    assert dp.last_stats["records"] == 6


def test_patient_records_are_clipped_whole_across_physical_chunks():
    x, y = _data(10, seed=1)
    patients = np.array([0, 0, 0, 0, 1, 2, 2, 3, 4, 4])  # patient 0 has more patches than a chunk
    model, opt = _setup(seed=1)
    C = 0.05
    dp = _engine(model, opt, patients, privacy_unit="patient", max_grad_norm=C, physical_batch_size=3)
    idx = dp.sample_batch()
    dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    whole = clipped_grad_sum(model, LOSS, x, y, max_grad_norm=C, record_ids=torch.from_numpy(patients))
    assert whole.n_records == 5 and dp.last_stats["records"] == 5
    for name, p in model.named_parameters():
        # .grad = (sum of clipped patient gradients) / E, E = q x 5 patients = 5
        assert torch.allclose(p.grad * 5, whole.grads[name], rtol=1e-4, atol=1e-7), name
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert total <= C * 5 / 5 * (1 + 1e-4)  # 5 records, each of norm <= C, divided by E = 5


def test_noise_has_the_calibrated_scale_and_divides_by_the_expected_batch_size():
    model, opt = _setup(mode="frozen_backbone")
    n_head = sum(p.numel() for p in trainable_parameters(model))
    # q = 2 / 40 = 0.05: P(empty batch) = 0.95^40 = 0.13
    dp = _engine(model, opt, np.arange(40), expected_batch_size=2, noise_multiplier=2.0, max_grad_norm=0.5,
                 noise_seed=0)
    x, y = _data(40)
    # An empty Poisson batch still takes a step: noise only, counted by the accountant.
    while True:
        idx = dp.sample_batch()
        if idx.numel() == 0:
            break
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    steps_before = dp.accountant.steps
    loss = dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    assert math.isnan(loss) and dp.last_stats["samples"] == 0
    assert dp.accountant.steps == steps_before + 1
    g = torch.cat([p.grad.flatten() for p in trainable_parameters(model)])
    assert g.numel() == n_head
    # pure noise N(0, (sigma C)^2) / E: std 2.0 * 0.5 / 2 = 0.5 (2146 draws: SE of std ~1.5%)
    assert g.std().item() == pytest.approx(0.5, rel=0.06)
    assert abs(g.mean().item()) < 0.05


def test_reported_epsilon_equals_an_independent_rdp_computation():
    model, opt = _setup(mode="frozen_backbone")
    dp = _engine(model, opt, np.arange(50), expected_batch_size=5, target_epsilon=3.0, noise_multiplier=None,
                 max_grad_norm=1.0, epochs=3)
    assert dp.sample_rate == pytest.approx(0.1) and dp.steps_per_epoch == 10 and dp.total_steps == 30
    x, y = _data(50)
    for _ in range(7):
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=0.1, noise_multiplier=dp.noise_multiplier, steps=7, orders=orders)
    expected, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-4)
    summary = dp.summary()
    assert summary["epsilon"] == pytest.approx(float(expected), rel=1e-12)
    assert summary["epsilon"] < 3.0
    for key in ("noise_multiplier", "sample_rate", "steps", "delta", "max_grad_norm", "accountant",
                "accountant_fallback", "privacy_unit", "epsilon"):
        assert key in summary
    assert summary["steps"] == 7 and summary["accountant"] == "rdp" and summary["accountant_fallback"] is False


def _run(dp, model, opt, x, y, steps):
    batches = []
    for _ in range(steps):
        idx = dp.sample_batch()
        batches.append(idx.tolist())
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batches


@pytest.mark.parametrize("seeded", [True, False])
def test_resume_gives_the_same_batches_epsilon_and_weights(seeded):
    x, y = _data(24, seed=5)
    patients = np.arange(24) // 2
    kw = dict(privacy_unit="patient", expected_batch_size=3, noise_multiplier=1.5, max_grad_norm=1.0,
              noise_seed=7 if seeded else None, sampler_seed=11, epochs=2)
    model, opt = _setup(mode="frozen_backbone", seed=2)
    dp = _engine(model, opt, patients, **kw)
    straight = _run(dp, model, opt, x, y, 6)

    model1, opt1 = _setup(mode="frozen_backbone", seed=2)
    dp1 = _engine(model1, opt1, patients, **kw)
    first = _run(dp1, model1, opt1, x, y, 3)
    ckpt = copy.deepcopy({"model": model1.state_dict(), "opt": opt1.state_dict(), "dp": dp1.state_dict()})
    del model1, opt1, dp1  # the run is killed here

    model2, opt2 = _setup(mode="frozen_backbone", seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    dp2 = _engine(model2, opt2, patients, **{**kw, "sampler_seed": 12345})
    dp2.load_state_dict(ckpt["dp"])
    second = _run(dp2, model2, opt2, x, y, 3)

    assert first + second == straight
    assert dp2.steps_taken == dp.steps_taken == 6
    assert dp2.epsilon_spent() == dp.epsilon_spent() > 0
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert same == seeded  # only a seeded noise stream is replayed (never saved otherwise)
    other = _engine(*_setup(mode="frozen_backbone"), patients, **{**kw, "noise_multiplier": 2.0})
    with pytest.raises(PrivacyError):
        other.load_state_dict(ckpt["dp"])  # resuming with another sigma is refused


def test_prv_accountant_is_used_when_it_works():
    model, opt = _setup(mode="frozen_backbone")
    dp = _engine(model, opt, np.arange(100), expected_batch_size=10, target_epsilon=4.0, noise_multiplier=None,
                 accountant="prv", max_grad_norm=1.0, epochs=2)
    x, y = _data(100)
    for _ in range(3):
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    s = dp.summary()
    assert s["accountant"] == "prv" and not s["accountant_fallback"]
    assert 0 < s["epsilon"] < 4.0


def test_non_private_mode_keeps_the_loop_shape():
    x, y = _data(12)
    model, opt = _setup()
    dp = _engine(model, opt, np.arange(12), expected_batch_size=6, target_epsilon=math.inf, noise_multiplier=None)
    assert not dp.private and dp.noise_multiplier == 0.0
    idx = dp.sample_batch()
    dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    # The private mode's estimator: loss-gradient SUM over the batch / EXPECTED batch size.
    plain = torch.autograd.grad(LOSS(model(x[idx]), y[idx]) * len(idx) / 6, trainable_parameters(model))
    for p, g in zip(trainable_parameters(model), plain):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)
    s = dp.summary()
    assert s["epsilon"] == math.inf and s["accountant"] == "none" and not s["private"]


def test_misuse_is_refused_with_privacy_errors():
    x, y = _data(8)
    model, opt = _setup()
    dp = _engine(model, opt, np.arange(8), expected_batch_size=4)
    with pytest.raises(PrivacyError):
        dp.step(x[:2], y[:2], LOSS, record_idx=torch.arange(2))  # no sample_batch() first
    idx = dp.sample_batch()
    other = idx[:-1] if idx.numel() else torch.arange(3)
    with pytest.raises(PrivacyError):
        dp.step(x[other], y[other], LOSS, record_idx=other)  # not the Poisson batch
    with pytest.raises(PrivacyError):
        dp.step(x[:1], y[:1], LOSS, record_idx=idx) if idx.numel() != 1 else dp.step(x[:2], y[:2], LOSS, record_idx=idx)
    with pytest.raises(PrivacyError):
        _engine(model, opt, np.array([0, 0, 1]))  # patch unit needs distinct records
    with pytest.raises(PrivacyError):
        _engine(model, opt, np.arange(8), expected_batch_size=9)
    with pytest.raises(PrivacyError):
        _engine(model, opt, np.arange(8), privacy_unit="hospital")
    with pytest.raises(PrivacyError):
        _engine(model, opt, np.arange(8), noise_multiplier=None, target_epsilon=None)
    with pytest.raises(ConfigError):
        _engine(model, opt, np.arange(8), accountant="moments")
    stray = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(PrivacyError):
        _engine(model, torch.optim.SGD([stray], lr=0.1), np.arange(8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_private_step_on_cuda_with_bf16_autocast():
    x, y = _data(16)
    model, _ = _setup()
    model.cuda()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    dp = _engine(model, opt, np.arange(16), expected_batch_size=8, noise_multiplier=1.0, max_grad_norm=1.0,
                 autocast_dtype=torch.bfloat16, noise_seed=0)
    assert dp.noise_generator.device.type == "cuda"
    idx = dp.sample_batch()
    loss = dp.step(x[idx], y[idx], LOSS, record_idx=idx)  # CPU tensors, moved per chunk
    opt.step()
    assert math.isfinite(loss) or idx.numel() == 0
    assert all(p.grad.device.type == "cuda" and torch.isfinite(p.grad).all() for p in trainable_parameters(model))


def test_a_forced_cublas_tf32_override_is_stated(monkeypatch, caplog):
    # cuBLAS' override beats any precision setting: the engine cannot make clipping exact then.
    model, opt = _setup("frozen_backbone")
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    with caplog.at_level("WARNING", logger="mammodp.privacy.engine"):
        _engine(model, opt, np.arange(8), noise_multiplier=1.0, max_grad_norm=1.0)
    assert any("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.delenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
    with caplog.at_level("WARNING", logger="mammodp.privacy.engine"):
        _engine(model, torch.optim.AdamW(trainable_parameters(model), lr=1e-3), np.arange(8), noise_multiplier=1.0,
                max_grad_norm=1.0)
    assert not any("TF32" in r.getMessage() for r in caplog.records)


_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist")


@pytest.mark.parametrize(("unit", "method"), [("patch", "auto"), ("patient", "auto"), ("patient", "vmap"),
                                              ("patch", "hooks")])
def test_a_private_step_reads_no_value_back_and_hands_the_loss_over_as_a_tensor(monkeypatch, unit, method):
    # On CUDA, reading a tensor's value (float(), .item(), int(), bool(), .tolist()) makes the host
    # wait for every queued kernel; a step that never does lets the host queue the next step's work
    # while the device runs this one (the loss used to be read back twice a chunk: the clipped
    # count and the loss sum). On the CPU every read is visible: inside a step (after the first,
    # whose one-off check of the route reads values), any read of a value fails the test; only
    # numpy() of integer tensors is allowed (the host's sample indices and record ids).
    records = np.arange(8) if unit == "patch" else np.repeat(np.arange(4), 2)
    model, opt = _setup()
    dp = _engine(model, opt, records, privacy_unit=unit, expected_batch_size=len(np.unique(records)) // 2,
                 noise_multiplier=1.0, max_grad_norm=0.5, per_sample_method=method, grad_chunk=2,
                 physical_batch_size=4, noise_seed=0)
    x, y = _data(8)
    idx = dp.sample_batch()
    dp.step(x[idx], y[idx], LOSS, record_idx=idx)

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"the step read a value back: Tensor.{name} of a {tuple(self.shape)} tensor")
        return read

    real_numpy = torch.Tensor.numpy

    def numpy(self, *args, **kwargs):
        assert not (self.is_floating_point() or self.dtype == torch.bool), "the step read a value back: numpy()"
        return real_numpy(self, *args, **kwargs)

    steps = []
    for _ in range(6):
        idx = dp.sample_batch()
        with monkeypatch.context() as m:
            for name in _READS:
                m.setattr(torch.Tensor, name, refuse(name))
            m.setattr(torch.Tensor, "numpy", numpy)
            loss = dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        steps.append((idx, loss))
    assert any(idx.numel() for idx, _ in steps)
    for idx, loss in steps:  # no optimiser step between them: every loss is of the same weights
        assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.dtype == torch.float32
        if idx.numel():
            assert float(loss) == pytest.approx(float(LOSS(model(x[idx]), y[idx])), rel=1e-4)
        else:
            assert math.isnan(float(loss))
    # last_stats reads the clipped count when asked, and it is the count of records over C
    idx = steps[-1][0]
    ref = clipped_grad_sum(model, LOSS, x[idx], y[idx], max_grad_norm=0.5, record_ids=torch.from_numpy(records[idx]),
                           method="vmap")
    stats = dp.last_stats
    assert stats["samples"] == idx.numel() and stats["records"] == ref.n_records
    if ref.n_records:
        assert stats["clipped_fraction"] == pytest.approx(float((ref.norms > 0.5).float().mean()))
    assert dp.last_stats == stats  # read once, then kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("unit", "method", "physical"), [("patch", "auto", 16), ("patient", "auto", 16),
                                                        ("patch", "auto", 4), ("patient", "vmap", 4)])
def test_a_private_step_on_cuda_never_waits_for_the_device(unit, method, physical):
    # torch's sync debug mode raises on any call that makes the host wait for the device (a
    # value read, a blocking copy). The first step (the route's one-off check) may; later ones
    # not, also where physical chunks split the batch and patient packs go through vmap.
    records = np.arange(16) if unit == "patch" else np.repeat(np.arange(8), 2)
    x, y = _data(16)
    x, y = x.cuda(), y.cuda()
    model, _ = _setup()
    model.cuda()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    dp = _engine(model, opt, records, privacy_unit=unit, expected_batch_size=len(np.unique(records)) // 2,
                 noise_multiplier=1.0, max_grad_norm=1.0, per_sample_method=method, grad_chunk=8,
                 physical_batch_size=physical, autocast_dtype=torch.bfloat16)  # 4: chunks split the batch
    idx = dp.sample_batch()
    dp.step(x[idx.cuda()], y[idx.cuda()], LOSS, record_idx=idx)
    losses = []
    for _ in range(3):
        idx = dp.sample_batch()
        xb, yb = x[idx.cuda()], y[idx.cuda()]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses.append(dp.step(xb, yb, LOSS, record_idx=idx))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(loss.device.type == "cuda" for loss in losses)


def _sleep_seconds(seconds: float) -> int:
    """GPU clock cycles that torch.cuda._sleep spins for about `seconds` (measured)."""
    import time

    cycles = 10**8
    torch.cuda._sleep(1000)  # the first launch loads the kernel: not what is timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    return int(cycles * seconds / max(time.perf_counter() - t0, 1e-6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_tensors_reach_cuda_without_waiting_for_queued_kernels():
    # A copy from pageable memory may synchronise the stream inside the CUDA driver (torch's
    # sync debug mode does not see it): with a 1 s kernel queued, runtime.to_device must
    # return at once.
    import time

    from mammodp.runtime import to_device

    cycles = _sleep_seconds(1.0)
    host = torch.randn(64, 1, 64, 64)
    to_device(host, "cuda")  # the pinned pool's first allocation is not what is timed
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    out = to_device(host, "cuda")
    waited = time.perf_counter() - t0
    torch.cuda.synchronize()
    slept = time.perf_counter() - t0
    assert slept > 0.8, f"the queued kernel ran {slept:.2f} s, not ~1 s: the test would prove nothing"
    assert waited < 0.3, f"the host waited {waited:.2f} s for the device"
    assert torch.equal(out.cpu(), host)


class _HostCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Host-device traffic of the ops run under it: pageable host sources of copies to CUDA,
    copies back to the host, and CUDA ops handed host tensors (an index on the host)."""

    def __init__(self):
        super().__init__()
        self.problems: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        # every tensor handed to the op, also inside lists (an index's `indices`)
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        cpu_in = [t for t in tensors if t.device.type == "cpu"]
        cuda_out = any(o.device.type == "cuda" for o in outs)
        if name in ("_to_copy", "copy_") and cpu_in and cuda_out:
            if not all(t.is_pinned() for t in cpu_in):
                self.problems.append(f"{name} from pageable host memory {tuple(cpu_in[0].shape)}")
        elif name in ("_to_copy", "copy_") and any(t.device.type == "cuda" for t in tensors) and any(
                o.device.type == "cpu" for o in outs):
            self.problems.append(f"{name} back to the host")
        elif any(t.dim() for t in cpu_in) and any(t.device.type == "cuda" for t in tensors):  # 0-d: a scalar
            self.problems.append(f"{name} given a host tensor {tuple(cpu_in[0].shape)} beside CUDA ones")
        return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("unit", "physical"), [("patch", 16), ("patient", 16), ("patch", 4), ("patient", 4)])
def test_a_private_step_on_cuda_copies_only_from_pinned_memory(unit, physical):  # 4: the batch split in chunks
    # What training.fit does (a batch of host tensors, bf16). A CUDA copy from pageable host
    # memory may make the driver wait for the stream (torch's sync debug mode, test above,
    # does not see it): every host-to-device copy of a warm step must come from pinned memory
    # (runtime.to_device), none go back, and no CUDA op may be handed a host index.
    records = np.arange(16) if unit == "patch" else np.repeat(np.arange(8), 2)
    x, y = _data(16)
    model, _ = _setup()
    model.cuda()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    dp = _engine(model, opt, records, privacy_unit=unit, expected_batch_size=len(np.unique(records)) // 2,
                 noise_multiplier=1.0, max_grad_norm=1.0, per_sample_method="auto", grad_chunk=8,
                 physical_batch_size=physical, autocast_dtype=torch.bfloat16)
    for _ in range(2):  # the route's one-off check, warm-up
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], LOSS, record_idx=idx)
    for _ in range(3):
        idx = dp.sample_batch()
        spy = _HostCopies()
        with spy:
            loss = dp.step(x[idx], y[idx], LOSS, record_idx=idx)
        assert not spy.problems, spy.problems
        assert loss.device.type == "cuda"
