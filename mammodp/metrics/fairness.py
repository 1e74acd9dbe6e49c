"""Subgroup performance and statistical parity (Study B, REFERENCE.md).

Study B's definitions, reproduced exactly:
- per-subgroup metric (AUROC there);
- statistical parity difference SPD(g) = metric(g) minus the sample-weighted mean of the
  metric over the OTHER groups (weights = subgroup sizes); with two groups this is
  m(g1) - m(g2), e.g. "sex SPD = female minus male";
- age bins [0,30), [30,60), [60,70), [70,80), [80,100);
- Pearson's r between epsilon and SPD across the private (finite-epsilon) models.

A subgroup with one class has no AUROC/AUPRC: its metric is NaN and it is skipped
(neither given an SPD nor counted in the others' means) rather than crashing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm

from mammodp.metrics.classification import UndefinedMetricWarning, _check_inputs

__all__ = [
    "AGE_EDGES",
    "UNKNOWN",
    "age_bins",
    "epsilon_spd_correlation",
    "pairwise_parity_difference",
    "statistical_parity_difference",
    "subgroup_metrics",
]

AGE_EDGES = (0, 30, 60, 70, 80, 100)  # Study B's age bins, [lo, hi)
UNKNOWN = "unknown"  # label for a missing (or out-of-range) attribute


def _fmt_edge(x: float) -> str:
    # 30.0 -> "30", 42.5 -> "42.5": labels read like Study B's tables.
    return f"{float(x):g}"


def age_bins(ages: Any, edges: Sequence[float] = AGE_EDGES) -> pd.Series:
    """Bin ages into half-open intervals ``[lo,hi)`` labelled like ``"[60,70)"``.

    Args:
        ages: Ages in years (array-like or Series; NaN/None allowed).
        edges: Strictly increasing bin edges; bin i is ``edges[i] <= age < edges[i+1]``.

    Returns:
        Ordered categorical Series of labels (categories: the bins in order, then
        ``"unknown"``), with the input's index when ``ages`` is a Series. Missing ages are
        ``"unknown"``; ages outside ``[edges[0], edges[-1])`` are too, with a warning.

    Raises:
        ValueError: Fewer than two edges, edges not strictly increasing, or non-numeric ages.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError(f"edges must be at least two finite, strictly increasing numbers; got {edges!r}")
    index = ages.index if isinstance(ages, pd.Series) else None
    try:
        a = pd.to_numeric(pd.Series(np.asarray(ages, dtype=object).ravel(), index=index),
                          errors="raise").astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ages must be numeric (years) or missing: {exc}") from exc
    labels = [f"[{_fmt_edge(lo)},{_fmt_edge(hi)})" for lo, hi in zip(e[:-1], e[1:])]
    # searchsorted(side="right") - 1 puts an age equal to an edge into the bin it opens.
    idx = np.searchsorted(e, a.to_numpy(), side="right") - 1
    known = a.notna().to_numpy()
    inside = known & (idx >= 0) & (idx < len(labels))
    if (known & ~inside).any():
        warnings.warn(f"{int((known & ~inside).sum())} age(s) outside "
                      f"[{_fmt_edge(e[0])},{_fmt_edge(e[-1])}) binned as {UNKNOWN!r}",
                      stacklevel=2)
    out = np.full(a.size, UNKNOWN, dtype=object)
    out[inside] = np.asarray(labels, dtype=object)[idx[inside]]
    cat = pd.CategoricalDtype(labels + [UNKNOWN], ordered=True)
    return pd.Series(out, index=a.index, name="age_bin").astype(cat)


def subgroup_metrics(df: pd.DataFrame, group_col: str, y_col: str = "label",
                     p_col: str = "p_malignant") -> pd.DataFrame:
    """Per-subgroup size, prevalence, AUROC and AUPRC (malignant positive).

    Rows whose group is missing are left out, with a warning giving their number (bin
    them explicitly first, as :func:`age_bins` does, to keep them as a group).

    Args:
        df: One row per sample with labels, probabilities and the group attribute.
        group_col: Column holding the subgroup (e.g. ``"age_bin"``, ``"breast_density"``).
        y_col: Label column (1 = malignant).
        p_col: Malignancy-probability column.

    Returns:
        DataFrame indexed by subgroup (index name ``"group"``; categorical groups keep
        their order, empty categories are dropped) with columns ``n`` (int),
        ``n_malignant`` (int), ``prevalence``, ``auroc`` and ``auprc`` (NaN for a
        subgroup with one class, with one warning naming those subgroups).

    Raises:
        ValueError: Missing columns or malformed labels/probabilities.
    """
    missing = [c for c in (group_col, y_col, p_col) if c not in df.columns]
    if missing:
        raise ValueError(f"subgroup_metrics: columns {missing} not in DataFrame "
                         f"(has {list(df.columns)})")
    y, p = _check_inputs(df[y_col], df[p_col], name_y=y_col, name_p=p_col)
    groups = df[group_col].reset_index(drop=True)
    present = groups.notna().to_numpy()
    if not present.all():
        warnings.warn(f"subgroup_metrics: {int((~present).sum())} row(s) with missing "
                      f"{group_col!r} left out", stacklevel=2)
    frame = pd.DataFrame({"group": groups[present], "y": y[present], "p": p[present]})

    rows = []
    undefined = []
    for g, sub in frame.groupby("group", observed=True, sort=True):
        ys, ps = sub["y"].to_numpy(), sub["p"].to_numpy()
        n, n_pos = int(ys.size), int(ys.sum())
        if 0 < n_pos < n:
            auroc = float(skm.roc_auc_score(ys, ps))
            auprc = float(skm.average_precision_score(ys, ps))
        else:
            auroc = auprc = float("nan")
            undefined.append(g)
        rows.append({"group": g, "n": n, "n_malignant": n_pos, "prevalence": n_pos / n,
                     "auroc": auroc, "auprc": auprc})
    if undefined:
        warnings.warn(f"subgroup_metrics: {group_col} subgroup(s) {undefined} have one class; "
                      "their auroc/auprc are NaN", UndefinedMetricWarning, stacklevel=2)
    out = pd.DataFrame(rows, columns=["group", "n", "n_malignant", "prevalence", "auroc", "auprc"])
    return out.set_index("group")


def _check_per_group(per_group_df: pd.DataFrame, metric: str) -> None:
    for col in (metric, "n"):
        if col not in per_group_df.columns:
            raise ValueError(f"per-group table lacks column {col!r} "
                             f"(has {list(per_group_df.columns)})")


def statistical_parity_difference(per_group_df: pd.DataFrame, metric: str = "auroc") -> pd.Series:
    """Study B's SPD of every subgroup: m(g) minus the n-weighted mean of m over the others.

    SPD(g) = m(g) - sum_{h != g} n_h m(h) / sum_{h != g} n_h, taking only groups h whose
    metric is finite. With two groups SPD(g1) = m(g1) - m(g2) (and SPD(g2) = -SPD(g1)).

    Args:
        per_group_df: Output of :func:`subgroup_metrics` (needs columns ``n`` and ``metric``),
            one row per subgroup.
        metric: Column to compare, e.g. ``"auroc"``.

    Returns:
        Series of SPDs indexed like ``per_group_df`` (name ``"spd_<metric>"``); NaN for a
        group whose metric is NaN or when no other group has a finite metric.

    Raises:
        ValueError: Missing columns or negative sizes.
    """
    _check_per_group(per_group_df, metric)
    m = per_group_df[metric].to_numpy(dtype=np.float64)
    n = per_group_df["n"].to_numpy(dtype=np.float64)
    if np.any(n < 0) or np.any(~np.isfinite(n)):
        raise ValueError("per-group sizes 'n' must be finite and non-negative")
    ok = np.isfinite(m)
    w = np.where(ok, n, 0.0)
    wm = np.where(ok, n * np.where(ok, m, 0.0), 0.0)
    # Leave-one-out weighted mean: totals minus the group's own contribution.
    others_w = w.sum() - w
    others_wm = wm.sum() - wm
    with np.errstate(invalid="ignore", divide="ignore"):
        others_mean = others_wm / others_w
    spd = np.where(ok & (others_w > 0), m - others_mean, np.nan)
    return pd.Series(spd, index=per_group_df.index, name=f"spd_{metric}")


def pairwise_parity_difference(per_group_df: pd.DataFrame, metric: str, group: Any,
                               reference: Any) -> float:
    """Two-group SPD: m(group) - m(reference), e.g. sex SPD = female minus male.

    Equal to :func:`statistical_parity_difference` of ``group`` when the table holds just
    these two groups; with more groups it ignores the rest.

    Args:
        per_group_df: Per-subgroup table indexed by group (from :func:`subgroup_metrics`).
        metric: Column to compare.
        group: Index label of the group of interest (``"F"``).
        reference: Index label of the reference group (``"M"``).

    Returns:
        The difference as a float (NaN when either metric is NaN).

    Raises:
        ValueError: Missing column or group.
    """
    if metric not in per_group_df.columns:
        raise ValueError(f"per-group table lacks column {metric!r}")
    for g in (group, reference):
        if g not in per_group_df.index:
            raise ValueError(f"group {g!r} not in per-group table (groups: "
                             f"{list(per_group_df.index)})")
    return float(per_group_df.at[group, metric]) - float(per_group_df.at[reference, metric])


def epsilon_spd_correlation(records: Iterable[Mapping[str, Any]] | pd.DataFrame, *,
                            epsilon_key: str = "epsilon", spd_key: str = "spd") -> dict[str, Any]:
    """Pearson's r between privacy budget and SPD across PRIVATE models.

    Non-private models (epsilon = inf) and records with a NaN SPD are left out: Study B
    correlates over the private models only.

    Args:
        records: One record per trained model (dicts or DataFrame rows) with an epsilon and
            an SPD (e.g. one subgroup's SPD, per seed or averaged).
        epsilon_key: Key/column of the privacy budget (float or "inf").
        spd_key: Key/column of the SPD.

    Returns:
        ``{"r": float, "p_value": float, "n": int, "reason": str | None}``; ``r`` and
        ``p_value`` are NaN with a ``reason`` when fewer than 3 private models remain or
        either variable is constant.

    Raises:
        ValueError: A record lacks ``epsilon_key`` or ``spd_key``.
    """
    rows = records.to_dict("records") if isinstance(records, pd.DataFrame) else list(records)
    eps, spd = [], []
    for i, r in enumerate(rows):
        if epsilon_key not in r or spd_key not in r:
            raise ValueError(f"record {i} lacks {epsilon_key!r} or {spd_key!r}: {dict(r)!r}")
        e, s = float(r[epsilon_key]), float(r[spd_key])
        if math.isfinite(e) and math.isfinite(s):
            eps.append(e)
            spd.append(s)
    n = len(eps)
    nan = float("nan")
    if n < 3:
        return {"r": nan, "p_value": nan, "n": n,
                "reason": f"need at least 3 private models with finite SPD, have {n}"}
    x, y = np.asarray(eps), np.asarray(spd)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        which = "epsilon" if np.ptp(x) == 0 else "SPD"
        return {"r": nan, "p_value": nan, "n": n, "reason": f"{which} is constant"}
    res = stats.pearsonr(x, y)
    return {"r": float(res.statistic), "p_value": float(res.pvalue), "n": n, "reason": None}
