"""One training loop: the non-private run is the DP run without clipping, noise and accounting."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mammodp.data.datasets import PatchTable
from mammodp.models.swin import create_classifier
from mammodp.training import FitSpec, fit


def _table(n: int, seed: int, size: int = 32) -> PatchTable:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.random((n, 1, size, size), dtype=np.float32) * 0.5 + labels[:, None, None, None] * 0.3
    frame = pd.DataFrame({"patient_id": [f"P{seed}_{i // 2}" for i in range(n)], "label": labels})
    return PatchTable(images=images.astype(np.float32), labels=labels.astype(np.int64), frame=frame)


def _spec(**kw) -> FitSpec:
    base = dict(epochs=2, lr=0.05, weight_decay=0.0, batch_size=4, physical_batch_size=3, label_smoothing=0.1,
                flip=True, amp=False, seed=3, epsilon=math.inf, delta=1e-4, max_grad_norm=1.0, accountant="rdp",
                privacy_unit="patch", grad_chunk=2, per_sample_method="hooks", reproducible_noise=True,
                synth_ratio=1.0)
    base.update(kw)
    return FitSpec(**base)


def _run(spec: FitSpec, private, public, val):
    torch.manual_seed(0)
    model = create_classifier("swin_micro", mode="full")
    res = fit(model, spec, private=private, public=public, val=val, device="cpu", progress=False,
              optimizer_factory=lambda p: torch.optim.SGD(p, lr=spec.lr))
    return model, res


@pytest.mark.parametrize("unit", ["patch", "patient"])
def test_inf_run_equals_a_dp_run_with_zero_noise_and_no_clipping(unit):
    """Same Poisson batches, same synthetic mixing, same flips, same estimator: same weights."""
    private, public, val = _table(12, 0), _table(10, 1), _table(6, 2)
    m_inf, r_inf = _run(_spec(privacy_unit=unit), private, public, val)
    m_dp, r_dp = _run(_spec(privacy_unit=unit, epsilon=50.0, noise_multiplier=0.0, max_grad_norm=math.inf),
                      private, public, val)
    assert r_inf.privacy["steps"] == r_dp.privacy["steps"] > 0
    assert r_inf.privacy["sample_rate"] == r_dp.privacy["sample_rate"]
    for (name, a), b in zip(m_inf.state_dict().items(), m_dp.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    # ...and the mixing really happened: without synthetic samples the weights differ.
    m_plain, _ = _run(_spec(privacy_unit=unit, synth_ratio=0.0), private, public, val)
    assert any(not torch.allclose(a, b, atol=1e-6)
               for a, b in zip(m_inf.state_dict().values(), m_plain.state_dict().values()))


def test_every_run_has_one_privacy_record_schema():
    private, public, val = _table(12, 0), _table(10, 1), _table(6, 2)
    _, r_inf = _run(_spec(epochs=1), private, public, val)
    _, r_dp = _run(_spec(epochs=1, epsilon=8.0), private, public, val)
    _, r_syn = _run(_spec(epochs=1), None, public, val)
    assert set(r_inf.privacy) == set(r_dp.privacy) == set(r_syn.privacy)
    assert r_inf.privacy["epsilon"] == math.inf and not r_inf.privacy["private"]
    assert 0 < r_dp.privacy["epsilon"] <= 8.0 + 1e-9 and r_dp.privacy["private"]
    assert r_syn.privacy["epsilon"] == 0.0 and not r_syn.privacy["trained_on_private"]


def test_a_records_flip_does_not_depend_on_the_other_records_sampled():
    """The augmentation stream advances by the same amount whatever the Poisson batch holds."""
    from mammodp.data.datasets import flip_masks

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    n = 20
    small, large = torch.tensor([3]), torch.tensor([1, 3, 7, 11, 19])
    for _ in range(3):  # several steps: the stream position must not drift with batch sizes
        h1, v1 = flip_masks(n, g1)
        h2, v2 = flip_masks(n, g2)
        assert bool(h1[small][0]) == bool(h2[large][1]) and bool(v1[small][0]) == bool(v2[large][1])


@pytest.mark.parametrize("epsilon,unit,flip", [(math.inf, "patch", True), (6.0, "patient", True), (6.0, "patch", False)])
def test_frozen_backbone_features_computed_once_train_the_head_as_the_per_step_forward_does(epsilon, unit, flip):
    """The feature cache (4 flip states computed once) gives the per-step route's updates:
    same Poisson batches, flips, synthetic mixing, noise and privacy record."""
    private, public, val = _table(12, 0), _table(10, 1), _table(6, 2)
    spec = _spec(epsilon=epsilon, privacy_unit=unit, flip=flip, epochs=2)
    runs = []
    for cache in (True, False):
        torch.manual_seed(0)
        model = create_classifier("swin_micro", mode="frozen_backbone")
        res = fit(model, spec, private=private, public=public, val=val, device="cpu", progress=False,
                  optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.5), cache_features=cache)
        runs.append((model, res))
    (m_c, r_c), (m_r, r_r) = runs
    assert r_c.privacy == r_r.privacy
    changed = False
    for (name, a), b in zip(m_c.state_dict().items(), m_r.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    np.testing.assert_allclose(r_c.val_probs, r_r.val_probs, rtol=1e-4, atol=1e-5)
    # the head did train (a cache that skipped the updates would also "agree")
    torch.manual_seed(0)
    fresh = create_classifier("swin_micro", mode="frozen_backbone")
    assert any(not torch.allclose(a, b) for a, b in zip(fresh.head.state_dict().values(), m_c.head.state_dict().values()))


def test_the_feature_cache_is_the_backbone_under_each_flip():
    from mammodp.data.datasets import apply_flips
    from mammodp.training import FrozenFeatures

    torch.manual_seed(0)
    model = create_classifier("swin_micro", mode="frozen_backbone").eval()
    x = torch.as_tensor(_table(5, 0).images)
    cache = FrozenFeatures(model.features, x, "cpu")
    idx = torch.tensor([4, 0, 2])
    h, v = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    with torch.no_grad():
        want = model.features(apply_flips(x[idx], h, v))
    torch.testing.assert_close(cache.take(idx, h, v), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cache.take(idx, h, v), cache.take(idx))  # flips change features


def test_learning_rate_warms_up_then_decays_by_step_count():
    spec = _spec(lr=1.0, warmup_epochs=2, cosine=True)
    per_epoch, total = 5, 50
    lrs = [spec.lr_at(s, total, per_epoch) for s in range(total)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up over 2 epochs
    assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01
    assert _spec(lr=0.3).lr_at(17, total, per_epoch) == 0.3  # no schedule: constant


@pytest.mark.parametrize("mode", ["full", "frozen_backbone"])
def test_without_a_validation_set_the_run_trains_the_same_and_returns_its_final_weights(mode):
    """`val=None` (the audit's models): no scoring, no selection; same updates as a scored run."""
    private, val = _table(12, 0), _table(6, 2)
    spec = _spec(epochs=3, epsilon=4.0)
    runs = []
    for v in (val, None):
        torch.manual_seed(0)
        model = create_classifier("swin_micro", mode=mode)
        res = fit(model, spec, private=private, public=None, val=v, device="cpu", progress=False,
                  optimizer_factory=lambda p: torch.optim.SGD(p, lr=spec.lr))
        runs.append((model, res))
    (m_val, r_val), (m_none, r_none) = runs
    for (name, a), b in zip(m_val.state_dict().items(), m_none.state_dict().values()):
        assert torch.equal(a, b), name  # scoring the validation set never touched training
    assert r_none.best_epoch == spec.epochs - 1 and r_none.val_probs is None
    assert all(math.isnan(h["val_auprc"]) for h in r_none.history) and len(r_none.history) == spec.epochs
    assert r_none.selection.startswith("final weights")
    for (name, a), b in zip(m_none.state_dict().items(), r_none.best_state.values()):
        assert torch.equal(a, b), name
    assert r_none.privacy["epsilon"] == r_val.privacy["epsilon"] <= 4.0
