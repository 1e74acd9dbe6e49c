"""Classification metrics, thresholds and bootstrap CIs against scikit-learn and hand values."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from mammodp.metrics.classification import (
    CI_METRICS,
    METRIC_NAMES,
    UndefinedMetricWarning,
    bootstrap_ci,
    choose_threshold,
    classification_metrics,
    evaluate_predictions,
    pr_curve,
    roc_curve,
)


def _random(n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # Scores informative but noisy; rounding makes many tied scores (sklearn groups them).
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, (np.round(p, 1) if ties else p)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_metrics_agree_with_sklearn(seed, ties):
    y, p = _random(150, seed, ties)
    m = classification_metrics(y, p, threshold=0.5)
    assert list(m) == list(METRIC_NAMES)
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, (p >= 0.5).astype(int)))
    # Benign-positive AUPRC (the paper's figure) = AP with flipped labels and scores.
    assert m["auprc_benign"] == pytest.approx(skm.average_precision_score(1 - y, 1 - p))
    assert m["n"] == 150 and m["prevalence"] == pytest.approx(y.mean())


def test_sensitivity_specificity_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.2, 0.7, 0.4, 0.1, 0.5]
    m = classification_metrics(y, p, threshold=0.5)
    # Malignant predicted at p >= 0.5: TP = 2 (0.9, 0.6), FN = 1; FP = 2 (0.7, 0.5), TN = 2.
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["prevalence"] == pytest.approx(3 / 7)
    # Threshold is inclusive: at 0.6 the 0.6 case is still malignant, 0.5 now benign.
    m2 = classification_metrics(y, p, threshold=0.6)
    assert m2["sensitivity"] == pytest.approx(2 / 3) and m2["specificity"] == pytest.approx(3 / 4)


def test_youden_threshold_by_hand():
    y = [0, 0, 0, 1, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8]
    # Candidate t (predict 1 if p >= t): J = TPR - FPR
    #   0.8: 1/4-0 = .25; 0.7: .5; 0.6: .75; 0.4: .75-.25 = .5; 0.35: 1-.25 = .75;
    #   0.3: 1-.5 = .5 ... Max .75 at 0.6 and 0.35: the highest (most specific) wins.
    assert choose_threshold(y, p) == pytest.approx(0.6)
    assert choose_threshold(y, p, method="fixed", fixed=0.3) == 0.3
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_threshold(y, p, method="median")
    with pytest.warns(UndefinedMetricWarning, match="one class"):
        assert choose_threshold([1, 1], [0.2, 0.9], fixed=0.4) == 0.4


@pytest.mark.parametrize(
    "y, p, match",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0"),
        ([0, 1, np.nan], [0.1, 0.2, 0.3], "missing"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
        ([0, 1], [0.1, 0.2, 0.3], "different lengths"),
        ([[0, 1], [1, 0]], [0.1, 0.2], "1-D"),
        ([0, 1], [[0.1, 0.9], [0.2, 0.8]], "1-D"),
        ([], [], "empty"),
        ([0, 1], [-2.0, 3.0], "logits"),
        (["a", "b"], [0.1, 0.2], "numeric"),
    ],
)
def test_inputs_checked_up_front(y, p, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, p)


def test_pandas_nullable_labels_accepted_and_na_rejected():
    y = pd.Series([0, 1, 1, 0], dtype="Int64")
    assert classification_metrics(y, [0.1, 0.8, 0.7, 0.2])["auroc"] == 1.0
    with pytest.raises(ValueError, match="missing"):
        classification_metrics(pd.Series([0, 1, None], dtype="Int64"), [0.1, 0.2, 0.3])


def test_single_class_gives_nan_with_warning():
    with pytest.warns(UndefinedMetricWarning):
        m = classification_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert np.isnan(m["auprc"]) and np.isnan(m["auroc"]) and np.isnan(m["auprc_benign"])
    assert np.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 3)


def test_curves_are_sklearn_curves():
    y, p = _random(80, 3)
    prec, rec, thr = pr_curve(y, p)
    sp, sr, st = skm.precision_recall_curve(y, p)
    np.testing.assert_allclose(prec, sp)
    np.testing.assert_allclose(rec, sr)
    np.testing.assert_allclose(thr, st)
    roc = roc_curve(y, p)
    fpr, tpr, _ = skm.roc_curve(y, p)
    np.testing.assert_allclose(roc.fpr, fpr)
    np.testing.assert_allclose(roc.tpr, tpr)
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_vectorised_metrics_equal_sklearn_on_each_resample(ties):
    """The fast weighted metrics equal scikit-learn on the explicit resamples."""
    y, p = _random(60, 4, ties)
    names = ["auprc", "auprc_benign", "auroc", "accuracy", "sensitivity", "specificity"]
    fns = {
        "auprc": skm.average_precision_score,
        "auprc_benign": lambda a, b: skm.average_precision_score(1 - a, 1 - b),
        "auroc": skm.roc_auc_score,
        "accuracy": lambda a, b: skm.accuracy_score(a, (b >= 0.4).astype(int)),
        "sensitivity": lambda a, b: skm.recall_score(a, (b >= 0.4).astype(int)),
        "specificity": lambda a, b: skm.recall_score(1 - a, (b < 0.4).astype(int)),
    }
    fast = bootstrap_ci(y, p, names, n_boot=50, ci=0.9, seed=7, threshold=0.4)
    slow = bootstrap_ci(y, p, fns, n_boot=50, ci=0.9, seed=7)
    for name in names:
        assert fast[name] == pytest.approx(slow[name], abs=1e-12), name


def test_bootstrap_ci_contains_point_deterministic_and_narrows():
    y, p = _random(200, 5)
    point = classification_metrics(y, p)
    a = bootstrap_ci(y, p, ["auprc", "auroc"], 200, 0.95, 11)
    assert a == bootstrap_ci(y, p, ["auprc", "auroc"], 200, 0.95, 11)
    assert a != bootstrap_ci(y, p, ["auprc", "auroc"], 200, 0.95, 12)
    for name in ("auprc", "auroc"):
        lo, hi = a[name]
        assert lo < point[name] < hi
    y_big, p_big = _random(3000, 5)
    b = bootstrap_ci(y_big, p_big, "auroc", 200, 0.95, 11)
    assert (b["auroc"][1] - b["auroc"][0]) < 0.5 * (a["auroc"][1] - a["auroc"][0])
    # A wider coverage gives a wider interval from the same resamples.
    c = bootstrap_ci(y, p, "auroc", 200, 0.99, 11)
    assert c["auroc"][0] <= a["auroc"][0] and c["auroc"][1] >= a["auroc"][1]


def test_bootstrap_is_fast():
    y, p = _random(200, 6)
    start = time.perf_counter()
    evaluate_predictions(y, p, n_boot=200, seed=0)
    assert time.perf_counter() - start < 1.0


def test_cluster_bootstrap_resamples_whole_groups():
    n_groups, size = 12, 4
    groups = np.repeat([f"patient{i}" for i in range(n_groups)], size)
    y = np.tile([0, 1, 0, 1], n_groups)
    p = np.linspace(0.01, 0.99, groups.size)  # unique: identifies each sample in a resample
    seen: list[np.ndarray] = []

    def record(yb, pb):
        seen.append(pb.copy())
        return float(len(pb))

    out = bootstrap_ci(y, p, {"size": record}, n_boot=30, seed=3, groups=groups)
    assert len(seen) == 30
    for pb in seen:
        counts = {v: c for v, c in zip(*np.unique(pb, return_counts=True))}
        per_group = [[counts.get(v, 0) for v in p[groups == g]] for g in np.unique(groups)]
        # Every member of a patient appears equally often: the patient was drawn k times.
        assert all(len(set(c)) == 1 for c in per_group)
        assert sum(c[0] for c in per_group) == n_groups
    # Equal-sized clusters: every resample has exactly n samples.
    assert out["size"] == (48.0, 48.0)
    # Plain bootstrap resamples single samples, so some patient is split in some resample.
    seen.clear()
    bootstrap_ci(y, p, {"size": record}, n_boot=30, seed=3)
    split = any(
        len(set(np.isin(p[groups == g], pb))) > 1 for pb in seen for g in np.unique(groups))
    assert split


def test_cluster_bootstrap_is_wider_for_correlated_patients():
    rng = np.random.default_rng(8)
    n_pat, per = 40, 10
    y_pat = rng.integers(0, 2, n_pat)
    # Patient-level score shared by all that patient's patches: patches are not independent.
    p_pat = np.clip(0.3 * y_pat + 0.7 * rng.random(n_pat), 0, 1)
    y, p = np.repeat(y_pat, per), np.repeat(p_pat, per) + rng.normal(0, 1e-3, n_pat * per)
    p = np.clip(p, 0, 1)
    groups = np.repeat(np.arange(n_pat), per)
    plain = bootstrap_ci(y, p, "auroc", 300, seed=1)["auroc"]
    cluster = bootstrap_ci(y, p, "auroc", 300, seed=1, groups=groups)["auroc"]
    assert cluster[1] - cluster[0] > 1.5 * (plain[1] - plain[0])


def test_bootstrap_argument_errors():
    y, p = _random(20, 9)
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci(y, p, "f1")
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(y, p, "auroc", 0)
    with pytest.raises(ValueError, match="ci"):
        bootstrap_ci(y, p, "auroc", 10, 1.5)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(y, p, "auroc", 10, groups=[1, 2])


def test_bootstrap_undefined_resamples_are_reported():
    y = np.array([0] * 9 + [1])
    p = np.linspace(0.05, 0.95, 10)
    with pytest.warns(UndefinedMetricWarning, match="left out"):
        lo, hi = bootstrap_ci(y, p, "auroc", 100, seed=0)["auroc"]
    assert 0 <= lo <= hi <= 1


def test_evaluate_predictions_keys_and_values():
    y, p = _random(120, 10)
    groups = np.arange(120) // 3
    out = evaluate_predictions(y, p, threshold=0.45, n_boot=100, ci=0.9, seed=2, groups=groups)
    expected = set(METRIC_NAMES) | {"threshold"}
    expected |= {f"{m}_ci_{s}" for m in CI_METRICS for s in ("low", "high")}
    assert set(out) == expected
    point = classification_metrics(y, p, threshold=0.45)
    for k, v in point.items():
        assert out[k] == pytest.approx(v)
    cis = bootstrap_ci(y, p, CI_METRICS, 100, 0.9, 2, groups=groups, threshold=0.45)
    for m in CI_METRICS:
        assert (out[f"{m}_ci_low"], out[f"{m}_ci_high"]) == cis[m]
    assert all(isinstance(v, (int, float)) for v in out.values())
    assert set(evaluate_predictions(y, p, n_boot=0)) == set(METRIC_NAMES) | {"threshold"}


def test_no_warnings_on_ordinary_data():
    y, p = _random(100, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_predictions(y, p, n_boot=50)
