"""Memorisation check: a planted copy of a training image (also flipped) is flagged."""

from __future__ import annotations

import numpy as np
import pytest

from mammodp.metrics import memorisation as memo


def _smooth(rng, n, size=24):
    """Random smooth images (blurred noise) in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    x = np.stack([gaussian_filter(rng.random((size, size)), 2) for _ in range(n)])
    x = (x - x.min()) / (x.max() - x.min())
    return x.astype(np.float32)


def test_planted_copies_are_flagged_and_point_to_their_source():
    rng = np.random.default_rng(0)
    train, heldout, fresh = _smooth(rng, 40), _smooth(rng, 20), _smooth(rng, 10)
    synthetic = np.concatenate([fresh, train[5:6], train[7:8, :, ::-1]])  # a copy and a mirrored copy
    res = memo.memorisation_check(synthetic, train, heldout, percentile=1.0, size=16)
    assert res.flagged[10] and res.flagged[11]
    assert res.synthetic_nearest[10] == 5 and res.synthetic_nearest[11] == 7
    assert res.synthetic_distance[10] == pytest.approx(0.0, abs=1e-6)
    assert not res.flagged[:10].any()
    assert res.fraction == pytest.approx(2 / 12)
    s = res.summary()
    assert s["n_flagged"] == 2 and s["n_baseline"] == 20 and s["threshold"] > 0


def test_nearest_neighbours_against_a_brute_force_loop():
    rng = np.random.default_rng(1)
    q, r = _smooth(rng, 5, 8), _smooth(rng, 7, 8)
    d, idx = memo.nearest_neighbours(q, r, size=8, flips=False)
    for i in range(5):
        rms = np.sqrt(((r - q[i]) ** 2).mean(axis=(1, 2)))
        assert idx[i] == rms.argmin() and d[i] == pytest.approx(rms.min(), rel=1e-5)


def test_figures_and_bad_input():
    rng = np.random.default_rng(2)
    train = _smooth(rng, 10)
    res = memo.memorisation_check(train[:3], train, _smooth(rng, 5), size=8)
    assert res.flagged.all()
    fig = memo.closest_pairs_figure(train[:3], train, res, k=8)
    assert len(fig.axes) == 6
    assert memo.distance_histogram_figure(res).axes
    with pytest.raises(ValueError, match="percentile"):
        memo.memorisation_check(train, train, train, percentile=0)
    with pytest.raises(ValueError, match="shape"):
        memo.nearest_neighbours(np.zeros((2, 2, 3, 3)), train)


def test_closest_pairs_can_withhold_the_real_patches():
    rng = np.random.default_rng(3)
    train = _smooth(rng, 10)
    res = memo.memorisation_check(train[:3], train, _smooth(rng, 5), size=8)
    shown = memo.closest_pairs_figure(train[:3], train, res, k=3)
    withheld = memo.closest_pairs_figure(train[:3], train, res, k=3, show_train=False)
    bottom = lambda fig: fig.axes[3:]  # noqa: E731  (second row: the training images)
    assert all(ax.images for ax in bottom(shown))
    assert not any(ax.images for ax in bottom(withheld))  # no real pixel in the shared figure
    assert all(ax.images for ax in withheld.axes[:3])  # the synthetic row stays
