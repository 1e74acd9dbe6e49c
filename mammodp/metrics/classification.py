"""Classification metrics, operating thresholds and bootstrap confidence intervals.

Convention (DESIGN.md): ``label = 1`` is malignant and is the positive class of the
primary metric ``auprc``. ``auprc_benign`` (benign positive) is reported beside it
because Study A's figures use benign as the positive class.

Every caller (training, evaluation, tuning, serving) goes through
:func:`evaluate_predictions`, so a number means the same thing wherever it is logged.

Point estimates come from scikit-learn. The bootstrap evaluates the same metrics for
all resamples at once: a resample is a row of integer multiplicities over the original
samples, which sorts the scores once instead of once per resample (checked against
scikit-learn in the tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

__all__ = [
    "METRIC_NAMES",
    "CI_METRICS",
    "PRCurve",
    "ROCCurve",
    "UndefinedMetricWarning",
    "bootstrap_ci",
    "choose_threshold",
    "classification_metrics",
    "evaluate_predictions",
    "pr_curve",
    "roc_curve",
]

# Keys of `classification_metrics`, in the order they are reported.
METRIC_NAMES = ("auprc", "auprc_benign", "auroc", "accuracy", "sensitivity", "specificity",
                "n", "prevalence")
# Metrics that get a bootstrap CI in `evaluate_predictions` (n and prevalence describe the
# evaluation set itself; a CI on them says nothing about the model).
CI_METRICS = ("auprc", "auprc_benign", "auroc", "accuracy", "sensitivity", "specificity")

# Softmax in float32 can land a hair outside [0, 1]; anything further out is not a
# probability and means the caller passed logits or the wrong column.
_PROB_TOL = 1e-6


class PRCurve(NamedTuple):
    """Precision-recall curve (malignant positive), as `sklearn.metrics.precision_recall_curve`."""

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray


class ROCCurve(NamedTuple):
    """ROC curve (malignant positive), as `sklearn.metrics.roc_curve`."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


# --------------------------------------------------------------------------- input checks

def _check_inputs(y_true: Any, p: Any, *, name_y: str = "y_true",
                  name_p: str = "p_malignant") -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and malignancy probabilities; return (int8 labels, float64 probs).

    Raises:
        ValueError: wrong shape, length mismatch, empty input, missing values, labels
            outside {0, 1}, or probabilities outside [0, 1].
    """
    y_arr = np.asarray(y_true, dtype=object if isinstance(y_true, pd.Series) else None)
    p_arr = np.asarray(p, dtype=object if isinstance(p, pd.Series) else None)
    if y_arr.ndim != 1:
        raise ValueError(f"{name_y} must be 1-D, got shape {y_arr.shape}")
    if p_arr.ndim != 1:
        raise ValueError(f"{name_p} must be 1-D, got shape {p_arr.shape}")
    if y_arr.shape[0] != p_arr.shape[0]:
        raise ValueError(f"{name_y} and {name_p} have different lengths: "
                         f"{y_arr.shape[0]} != {p_arr.shape[0]}")
    if y_arr.shape[0] == 0:
        raise ValueError(f"{name_y} is empty: no samples to evaluate")
    # pd.isna covers NaN, None and pandas' NA (nullable integer columns) alike.
    if pd.isna(y_arr).any():
        raise ValueError(f"{name_y} contains {int(pd.isna(y_arr).sum())} missing value(s)")
    try:
        y_num = y_arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name_y} must be numeric 0/1 labels, got dtype {y_arr.dtype}") from exc
    bad = np.setdiff1d(np.unique(y_num), [0.0, 1.0])
    if bad.size:
        raise ValueError(f"{name_y} must contain only 0 (benign) and 1 (malignant); "
                         f"found {bad[:5].tolist()}")
    if pd.isna(p_arr).any():
        raise ValueError(f"{name_p} contains {int(pd.isna(p_arr).sum())} NaN or missing value(s)")
    try:
        p_num = p_arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name_p} must be numeric, got dtype {p_arr.dtype}") from exc
    if not np.isfinite(p_num).all():
        raise ValueError(f"{name_p} contains {int((~np.isfinite(p_num)).sum())} "
                         "NaN or infinite value(s)")
    if p_num.min() < -_PROB_TOL or p_num.max() > 1 + _PROB_TOL:
        raise ValueError(f"{name_p} must be probabilities in [0, 1]; got range "
                         f"[{p_num.min():.4g}, {p_num.max():.4g}] (logits passed?)")
    return y_num.astype(np.int8), np.clip(p_num, 0.0, 1.0)


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return t


def _undefined(name: str, reason: str) -> float:
    warnings.warn(f"{name} undefined: {reason}; returning NaN", UndefinedMetricWarning,
                  stacklevel=3)
    return float("nan")


# --------------------------------------------------------------------------- point metrics

def classification_metrics(y_true: Any, p_malignant: Any, threshold: float = 0.5) -> dict[str, float]:
    """Point metrics of malignancy probabilities against labels.

    Ranking metrics (AUPRC, AUROC) need both classes; with one class present they are
    NaN with an ``UndefinedMetricWarning`` instead of an exception, so a tiny subgroup or
    validation fold does not crash a run.

    Args:
        y_true: Labels, 1 = malignant, 0 = benign, shape (n,).
        p_malignant: Predicted probability of malignancy, shape (n,), in [0, 1].
        threshold: Operating point: predict malignant when ``p >= threshold``.

    Returns:
        Dict with ``auprc`` (average precision, malignant positive; primary),
        ``auprc_benign`` (average precision of ``1 - y`` with ``1 - p``; Study A's metric),
        ``auroc``, ``accuracy``, ``sensitivity`` (recall of malignant),
        ``specificity`` (recall of benign), ``n`` (int) and ``prevalence``
        (malignant fraction). Values are plain Python floats.

    Raises:
        ValueError: Malformed inputs (see :func:`_check_inputs`) or threshold outside [0, 1].
    """
    y, p = _check_inputs(y_true, p_malignant)
    t = _check_threshold(threshold)
    n = int(y.size)
    n_pos = int(y.sum())
    n_neg = n - n_pos
    pred = p >= t

    if n_pos and n_neg:
        auprc = float(skm.average_precision_score(y, p))
        auprc_benign = float(skm.average_precision_score(1 - y, 1.0 - p))
        auroc = float(skm.roc_auc_score(y, p))
    else:
        only = "malignant" if n_neg == 0 else "benign"
        auprc = _undefined("auprc, auprc_benign and auroc", f"only {only} samples present")
        auprc_benign = float("nan")
        auroc = float("nan")
    sensitivity = (float(np.mean(pred[y == 1])) if n_pos
                   else _undefined("sensitivity", "no malignant samples"))
    specificity = (float(np.mean(~pred[y == 0])) if n_neg
                   else _undefined("specificity", "no benign samples"))
    return {
        "auprc": auprc,
        "auprc_benign": auprc_benign,
        "auroc": auroc,
        "accuracy": float(skm.accuracy_score(y, pred.astype(np.int8))),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "n": n,
        "prevalence": n_pos / n,
    }


def choose_threshold(y_val: Any, p_val: Any, method: Literal["youden", "fixed"] = "youden",
                     fixed: float = 0.5) -> float:
    """Operating threshold chosen on VALIDATION data.

    Study B picked Youden thresholds on the evaluation set itself, which inflates
    sensitivity and specificity; pass validation predictions here and apply the result
    to the test and external sets.

    Args:
        y_val: Validation labels (1 = malignant).
        p_val: Validation malignancy probabilities.
        method: ``"youden"``: the ROC threshold maximising J = sensitivity + specificity - 1
            (the highest such threshold on ties); ``"fixed"``: return ``fixed``.
        fixed: Threshold for ``method="fixed"``, and the fallback when Youden's J is
            undefined (one class in the validation set; a warning says so).

    Returns:
        Threshold t in [0, 1]; predictions are malignant when ``p >= t``.

    Raises:
        ValueError: Unknown method, malformed inputs, or ``fixed`` outside [0, 1].
    """
    fixed = _check_threshold(fixed)
    if method == "fixed":
        return fixed
    if method != "youden":
        raise ValueError(f"unknown threshold method {method!r}; choose 'youden' or 'fixed'")
    y, p = _check_inputs(y_val, p_val, name_y="y_val", name_p="p_val")
    if y.min() == y.max():
        warnings.warn("Youden threshold is undefined: validation set has one class; "
                      f"using the fixed threshold {fixed}", UndefinedMetricWarning, stacklevel=2)
        return fixed
    fpr, tpr, thresholds = skm.roc_curve(y, p, drop_intermediate=False)
    # thresholds[0] is +inf (predict nothing positive, J = 0); argmax takes the first,
    # i.e. highest, threshold among ties, the most specific operating point.
    j = tpr[1:] - fpr[1:]
    return float(thresholds[1:][int(np.argmax(j))])


def pr_curve(y_true: Any, p_malignant: Any) -> PRCurve:
    """Precision-recall curve with malignant as the positive class.

    Returns:
        ``PRCurve(precision, recall, thresholds)`` exactly as
        ``sklearn.metrics.precision_recall_curve`` returns them (``thresholds`` is one
        shorter; the last point is precision 1, recall 0).
    """
    y, p = _check_inputs(y_true, p_malignant)
    if y.max() == 0:
        raise ValueError("pr_curve needs at least one malignant sample (label 1)")
    precision, recall, thresholds = skm.precision_recall_curve(y, p)
    return PRCurve(precision, recall, thresholds)


def roc_curve(y_true: Any, p_malignant: Any) -> ROCCurve:
    """ROC curve with malignant as the positive class.

    Returns:
        ``ROCCurve(fpr, tpr, thresholds)`` as ``sklearn.metrics.roc_curve`` returns them.

    Raises:
        ValueError: Malformed inputs or only one class present.
    """
    y, p = _check_inputs(y_true, p_malignant)
    if y.min() == y.max():
        raise ValueError("roc_curve needs both classes (labels 0 and 1)")
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    return ROCCurve(fpr, tpr, thresholds)


# --------------------------------------------------------------------------- bootstrap
# Each resampling-weight matrix W has shape (B, n): W[b, i] is how often sample i occurs
# in resample b. A metric of resample b equals the sample-weighted metric with weights
# W[b], so all B resamples share one sort of the scores.

def _tie_groups(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending sort order of `score` and the start index of each run of tied scores."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def _weighted_ap(score: np.ndarray, y: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average precision (positive = y == 1) per row of weights W, shape (B,).

    Matches scikit-learn: AP = sum over distinct thresholds t of
    (R(t) - R(t_prev)) * P(t), with tied scores forming one threshold.
    """
    order, starts = _tie_groups(score)
    ys = y[order].astype(np.float64)
    Ws = W[:, order]
    pos_g = np.add.reduceat(Ws * ys, starts, axis=1)          # (B, groups)
    neg_g = np.add.reduceat(Ws * (1.0 - ys), starts, axis=1)
    # Predicting positive at a group's score takes that group and every higher one:
    # suffix sums over the ascending groups.
    tp = np.cumsum(pos_g[:, ::-1], axis=1)[:, ::-1]
    fp = np.cumsum(neg_g[:, ::-1], axis=1)[:, ::-1]
    denom = tp + fp
    precision = np.divide(tp, denom, out=np.zeros_like(tp), where=denom > 0)
    total_pos = pos_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (pos_g * precision).sum(axis=1) / total_pos
    ap[(total_pos == 0) | (neg_g.sum(axis=1) == 0)] = np.nan
    return ap


def _weighted_auroc(score: np.ndarray, y: np.ndarray, W: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney, ties count one half) per row of weights W, shape (B,)."""
    order, starts = _tie_groups(score)
    ys = y[order].astype(np.float64)
    Ws = W[:, order]
    pos_g = np.add.reduceat(Ws * ys, starts, axis=1)
    neg_g = np.add.reduceat(Ws * (1.0 - ys), starts, axis=1)
    neg_below = np.cumsum(neg_g, axis=1) - neg_g                # negatives with a lower score
    total_pos = pos_g.sum(axis=1)
    total_neg = neg_g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1) / (total_pos * total_neg)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc


def _weighted_rate(hit: np.ndarray, mask: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Weighted fraction of `hit` among samples in `mask`, per row of W (NaN if none)."""
    num = W @ (hit & mask).astype(np.float64)
    den = W @ mask.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den == 0] = np.nan
    return out


# Vectorised metric registry: name -> f(y, p, W, threshold) -> (B,) values.
_VECTOR_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]] = {
    "auprc": lambda y, p, W, t: _weighted_ap(p, y, W),
    "auprc_benign": lambda y, p, W, t: _weighted_ap(1.0 - p, 1 - y, W),
    "auroc": lambda y, p, W, t: _weighted_auroc(p, y, W),
    "accuracy": lambda y, p, W, t: _weighted_rate((p >= t) == (y == 1), np.ones(y.size, bool), W),
    "sensitivity": lambda y, p, W, t: _weighted_rate(p >= t, y == 1, W),
    "specificity": lambda y, p, W, t: _weighted_rate(p < t, y == 0, W),
    "prevalence": lambda y, p, W, t: _weighted_rate(y == 1, np.ones(y.size, bool), W),
}


def _resolve_metrics(metrics: Any) -> dict[str, str | Callable[[np.ndarray, np.ndarray], float]]:
    """Normalise the `metrics` argument of `bootstrap_ci` to {name: name | callable}."""
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    else:
        items = []
        for m in metrics:
            if isinstance(m, str):
                items.append((m, m))
            elif callable(m):
                items.append((getattr(m, "__name__", repr(m)), m))
            else:
                raise ValueError(f"metric must be a name or a callable, got {m!r}")
    if not items:
        raise ValueError("no metrics given")
    resolved: dict[str, str | Callable[[np.ndarray, np.ndarray], float]] = {}
    for name, m in items:
        if isinstance(m, str) and m not in _VECTOR_METRICS:
            raise ValueError(f"unknown metric {m!r}; known: {sorted(_VECTOR_METRICS)} "
                             "(or pass a callable f(y, p) -> float)")
        if not (isinstance(m, str) or callable(m)):
            raise ValueError(f"metric {name!r} must be a name or a callable, got {m!r}")
        resolved[str(name)] = m
    return resolved


def _group_codes(groups: Any, n: int) -> np.ndarray:
    g = np.asarray(groups, dtype=object)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must be 1-D with one entry per sample ({n}), got shape {g.shape}")
    if pd.isna(g).any():
        raise ValueError(f"groups contains {int(pd.isna(g).sum())} missing value(s)")
    # factorize keeps mixed types (str patient ids, ints) apart without sorting them.
    codes, _ = pd.factorize(pd.Series(g, dtype=object))
    return codes.astype(np.intp)


def _weight_chunks(codes: np.ndarray, n_boot: int, rng: np.random.Generator):
    """Yield resampling-weight matrices (chunk, n), B rows in all.

    Resampling draws len(unique groups) groups with replacement; a sample's weight is how
    often its group was drawn (plain bootstrap: every sample is its own group). Chunks
    bound memory at a few million entries; chunk sizes depend only on (n, B), so the
    draws, hence the CIs, are deterministic given the seed.
    """
    n_groups = int(codes.max()) + 1
    chunk = max(1, min(n_boot, 4_000_000 // max(codes.size, n_groups)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        # Per-row bincount in one call: offset each row's draws into its own block.
        counts = np.bincount((draws + n_groups * np.arange(b)[:, None]).ravel(),
                             minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, codes].astype(np.float64)
        done += b


def bootstrap_ci(y_true: Any, p: Any,
                 metrics: str | Callable | Sequence[str | Callable] | Mapping[str, str | Callable]
                 = ("auprc", "auroc"),
                 n_boot: int = 1000, ci: float = 0.95, seed: int = 0, *,
                 groups: Any = None, threshold: float = 0.5) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals.

    Resamples samples with replacement, or whole groups with ``groups`` (cluster
    bootstrap: patches of one patient are correlated, so resampling patches alone
    understates the uncertainty). Resamples in which a metric is undefined (one class
    drawn) are left out of that metric's percentiles, with an ``UndefinedMetricWarning``.

    Args:
        y_true: Labels, 1 = malignant.
        p: Malignancy probabilities.
        metrics: A metric name, a callable ``f(y, p) -> float``, a sequence of either,
            or a dict ``{name: name_or_callable}``. Names (vectorised, fast): ``auprc``,
            ``auprc_benign``, ``auroc``, ``accuracy``, ``sensitivity``, ``specificity``,
            ``prevalence``. Callables run once per resample.
        n_boot: Number of bootstrap resamples (>= 1).
        ci: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling generator; equal seeds give equal intervals.
        groups: Optional cluster id per sample (e.g. ``patient_id``).
        threshold: Operating point for ``accuracy``, ``sensitivity``, ``specificity``.

    Returns:
        ``{name: (lo, hi)}`` as Python floats; ``(nan, nan)`` when no resample defines
        the metric.

    Raises:
        ValueError: Malformed inputs, unknown metric name, bad ``n_boot``/``ci``/``groups``.
    """
    y, pr = _check_inputs(y_true, p)
    t = _check_threshold(threshold)
    resolved = _resolve_metrics(metrics)
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    n_boot = int(n_boot)
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")
    codes = (np.arange(y.size, dtype=np.intp) if groups is None
             else _group_codes(groups, y.size))

    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {name: [] for name in resolved}
    index = np.arange(y.size)
    for W in _weight_chunks(codes, n_boot, rng):
        for name, m in resolved.items():
            if isinstance(m, str):
                values[name].append(_VECTOR_METRICS[m](y, pr, W, t))
                continue
            reps = W.astype(np.intp)
            out = np.empty(W.shape[0])
            with warnings.catch_warnings():
                # One-class resamples are expected; they are counted and reported below.
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                for b in range(W.shape[0]):
                    idx = np.repeat(index, reps[b])
                    out[b] = float(m(y[idx], pr[idx]))
            values[name].append(out)

    alpha = (1.0 - float(ci)) / 2.0
    result: dict[str, tuple[float, float]] = {}
    for name, chunks in values.items():
        v = np.concatenate(chunks)
        ok = np.isfinite(v)
        if not ok.any():
            warnings.warn(f"bootstrap CI of {name} is undefined: no resample defines it",
                          UndefinedMetricWarning, stacklevel=2)
            result[name] = (float("nan"), float("nan"))
            continue
        if not ok.all():
            warnings.warn(f"bootstrap CI of {name}: {int((~ok).sum())} of {n_boot} resamples "
                          "left out (metric undefined, e.g. one class drawn)",
                          UndefinedMetricWarning, stacklevel=2)
        lo, hi = np.quantile(v[ok], [alpha, 1.0 - alpha])
        result[name] = (float(lo), float(hi))
    return result


def evaluate_predictions(y: Any, p: Any, *, threshold: float = 0.5, n_boot: int = 1000,
                         ci: float = 0.95, seed: int = 0, groups: Any = None) -> dict[str, float]:
    """The one metrics function of the project: point metrics plus bootstrap CIs.

    Training (validation per epoch), evaluation, tuning and serving all call this, so
    their numbers agree by construction.

    Args:
        y: Labels, 1 = malignant.
        p: Malignancy probabilities.
        threshold: Operating point for accuracy / sensitivity / specificity (choose it on
            validation data with :func:`choose_threshold`).
        n_boot: Bootstrap resamples; 0 skips the CIs (e.g. per-epoch validation).
        ci: Coverage of the intervals.
        seed: Bootstrap seed.
        groups: Optional cluster id per sample (patient) for a cluster bootstrap.

    Returns:
        Flat dict (MLflow-friendly): every key of :func:`classification_metrics`
        (``auprc, auprc_benign, auroc, accuracy, sensitivity, specificity, n, prevalence``),
        ``threshold``, and when ``n_boot > 0`` ``<m>_ci_low`` / ``<m>_ci_high`` for each
        ``m`` in :data:`CI_METRICS`.
    """
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    out: dict[str, float] = dict(classification_metrics(y, p, threshold=threshold))
    out["threshold"] = float(threshold)
    if n_boot > 0:
        cis = bootstrap_ci(y, p, CI_METRICS, int(n_boot), ci, seed, groups=groups,
                           threshold=threshold)
        for name in CI_METRICS:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = cis[name]
    return out
