"""Figures for evaluation reports, and curve data for ``dvc plots``.

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot: no
global figure registry to leak memory across a long evaluation, no GUI backend needed
(saving renders with Agg). Each function returns the Figure; the caller saves or logs
it (``fig.savefig(path)``, ``tracking.log_figure(fig, name)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn import metrics as skm

from mammodp.metrics.classification import _check_inputs, pr_curve, roc_curve
from mammodp.metrics.fairness import statistical_parity_difference

__all__ = ["curve_records", "plot_fairness", "plot_pr_roc", "plot_privacy_utility"]

_SPLIT_ORDER = ("internal", "external")
_SPLIT_TITLES = {"internal": "internal test (CBIS-DDSM)", "external": "external test (BCDR)"}


def curve_records(y: Any, p: Any, kind: str = "pr") -> list[dict[str, float]]:
    """Curve points as records for ``dvc plots`` data files (JSON/CSV).

    Args:
        y: Labels, 1 = malignant.
        p: Malignancy probabilities.
        kind: ``"pr"`` -> ``[{"recall", "precision", "threshold"}]`` (malignant positive);
            ``"roc"`` -> ``[{"fpr", "tpr", "threshold"}]``.

    Returns:
        One dict of plain floats per curve point, in the order scikit-learn returns them.
        The PR curve's final point (recall 0, precision 1) and the ROC curve's first point
        have no finite threshold; theirs is ``None`` so the records stay valid JSON.

    Raises:
        ValueError: Unknown kind, malformed inputs, or classes missing for the curve.
    """
    if kind == "pr":
        precision, recall, thr = pr_curve(y, p)
        thr_full = list(thr) + [None]  # sklearn's last PR point has no threshold
        return [{"recall": float(r), "precision": float(q),
                 "threshold": None if t is None else float(t)}
                for r, q, t in zip(recall, precision, thr_full)]
    if kind == "roc":
        fpr, tpr, thr = roc_curve(y, p)
        return [{"fpr": float(f), "tpr": float(t),
                 "threshold": float(h) if math.isfinite(h) else None}
                for f, t, h in zip(fpr, tpr, thr)]
    raise ValueError(f"unknown curve kind {kind!r}; choose 'pr' or 'roc'")


def plot_pr_roc(curves: Mapping[str, tuple[Any, Any]]) -> Figure:
    """Precision-recall (left) and ROC (right) curves, malignant positive.

    Args:
        curves: ``{name: (y, p)}``, e.g. ``{"internal": (y_test, p_test), "external": ...}``.

    Returns:
        Figure with two axes. The PR axes has one line per curve plus one dashed chance line
        per distinct prevalence (a random classifier's precision); the ROC axes has one
        line per curve plus the diagonal. Legends give AP / AUROC.

    Raises:
        ValueError: No curves, or a curve whose labels lack a class.
    """
    if not curves:
        raise ValueError("plot_pr_roc needs at least one curve")
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax_pr, ax_roc = fig.subplots(1, 2)
    prevalences: list[float] = []
    for name, (y, p) in curves.items():
        yy, pp = _check_inputs(y, p)
        if yy.min() == yy.max():
            raise ValueError(f"curve {name!r}: needs both classes to draw PR/ROC curves")
        prec, rec, _ = pr_curve(yy, pp)
        fpr, tpr, _ = roc_curve(yy, pp)
        # AP and AUROC from the curves drawn, so the legend matches the picture.
        ap = float(-np.sum(np.diff(rec) * prec[:-1]))
        auc = float(skm.auc(fpr, tpr))
        line, = ax_pr.plot(rec, prec, drawstyle="steps-post", label=f"{name} (AP={ap:.3f})")
        ax_roc.plot(fpr, tpr, color=line.get_color(), label=f"{name} (AUROC={auc:.3f})")
        prev = float(yy.mean())
        if not any(math.isclose(prev, q, abs_tol=5e-4) for q in prevalences):
            prevalences.append(prev)
    for prev in prevalences:
        ax_pr.axhline(prev, color="grey", linestyle="--", linewidth=1,
                      label=f"chance (prevalence {prev:.3f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax_pr.set(xlabel="recall (malignant)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
              title="Precision-recall")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate (sensitivity)",
               xlim=(0, 1), ylim=(0, 1.02), title="ROC")
    for ax in (ax_pr, ax_roc):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left" if ax is ax_pr else "lower right", fontsize=8)
    return fig


def _inf_position(finite: np.ndarray) -> float:
    """Where to draw epsilon = inf on a log axis: a clear gap right of the largest budget."""
    if finite.size == 0:
        return 1.0
    lo, hi = float(finite.min()), float(finite.max())
    span = math.log10(hi / lo) if hi > lo else 0.0
    return 10 ** (math.log10(hi) + max(0.4, 0.2 * span))


def plot_privacy_utility(df: pd.DataFrame, metric: str = "auprc") -> Figure:
    """Utility vs privacy budget, one line per training regime, one panel per test split.

    Epsilon is on a log axis; non-private models (epsilon = inf) sit at a separate
    rightmost tick "inf (non-private)" beyond a dotted separator, as points with error
    bars (joining them to the finite budgets would suggest a trend that does not exist).

    Args:
        df: Columns ``regime``, ``epsilon`` (float or "inf"), ``split`` ("internal",
            "external", any other split gets a panel after them), ``metric`` and its CI
            ``ci_low``, ``ci_high`` (NaN allowed: no band). Rows are normally already
            means over seeds; duplicates per (split, regime, epsilon) are averaged. An
            optional ``prevalence`` column draws the chance level of AUPRC per panel. An
            optional boolean ``covered`` column marks points whose end-to-end epsilon is
            not covered (for example synthetic data from a non-DP generator) with hollow
            markers: their x position is a target, not a guarantee.
        metric: The utility column to plot.

    Returns:
        Figure with one axes per split present; each axes has one line per regime with
        finite budgets (plus CI band) and one error-bar point per regime with epsilon inf.

    Raises:
        ValueError: Missing columns, empty table, or unparseable / non-positive epsilon.
    """
    need = ["regime", "epsilon", "split", metric, "ci_low", "ci_high"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"plot_privacy_utility: columns {missing} missing (has {list(df.columns)})")
    if df.empty:
        raise ValueError("plot_privacy_utility: empty table")
    data = df.copy()
    try:
        data["epsilon"] = data["epsilon"].map(lambda e: float(e))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"plot_privacy_utility: epsilon must be numbers or 'inf': {exc}") from exc
    if (data["epsilon"] <= 0).any() or data["epsilon"].isna().any():
        raise ValueError("plot_privacy_utility: epsilon must be positive (inf = non-private)")
    if "covered" in data:
        data["covered"] = data["covered"].astype(float)
    value_cols = [metric, "ci_low", "ci_high"] + [c for c in ("prevalence", "covered") if c in data]
    data = (data.groupby(["split", "regime", "epsilon"], sort=True)[value_cols]
            .mean().reset_index())

    splits = [s for s in _SPLIT_ORDER if s in set(data["split"])]
    splits += sorted(set(data["split"]) - set(_SPLIT_ORDER), key=str)
    regimes = list(dict.fromkeys(df["regime"]))  # first-seen order = the caller's order
    finite = np.unique(data.loc[np.isfinite(data["epsilon"]), "epsilon"].to_numpy())
    has_inf = bool(np.isinf(data["epsilon"]).any())
    x_inf = _inf_position(finite)

    fig = Figure(figsize=(5.5 * len(splits), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(splits), sharey=True))
    colors = {r: f"C{i % 10}" for i, r in enumerate(regimes)}
    for ax, split in zip(axes, splits):
        part = data[data["split"] == split]
        for regime in regimes:
            rows = part[part["regime"] == regime].sort_values("epsilon")
            if rows.empty:
                continue
            fin = rows[np.isfinite(rows["epsilon"])]
            inf = rows[np.isinf(rows["epsilon"])]
            label = str(regime)
            if not fin.empty:
                ax.plot(fin["epsilon"], fin[metric], marker="o", color=colors[regime], label=label)
                ax.fill_between(fin["epsilon"], fin["ci_low"], fin["ci_high"],
                                color=colors[regime], alpha=0.15, linewidth=0)
                label = "_nolegend_"
            if not inf.empty:
                v = inf.iloc[0]
                yerr = np.array([[v[metric] - v["ci_low"]], [v["ci_high"] - v[metric]]])
                ax.errorbar([x_inf], [v[metric]],
                            yerr=None if np.isnan(yerr).any() else yerr,
                            fmt="s", color=colors[regime], capsize=4, label=label)
            if "covered" in rows:
                bad = rows[rows["covered"] < 1]
                if not bad.empty:
                    xs = [e if math.isfinite(e) else x_inf for e in bad["epsilon"]]
                    ax.scatter(xs, bad[metric], s=70, facecolors="white", edgecolors=colors[regime], linewidths=1.5,
                               zorder=4, label="not covered end to end (hollow)")
        if "prevalence" in part and part["prevalence"].notna().any():
            ax.axhline(float(part["prevalence"].mean()), color="grey", linestyle="--",
                       linewidth=1, label="chance (prevalence)")
        ax.set_xscale("log")
        ticks = list(finite)
        labels = [f"{e:g}" for e in finite]
        if has_inf:
            if finite.size:
                # Dotted separator: the axis is not continuous between max(eps) and inf.
                ax.axvline(math.sqrt(finite.max() * x_inf), color="grey", linestyle=":",
                           linewidth=1)
            ticks.append(x_inf)
            labels.append("inf\n(non-private)")
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
        lo_x = finite.min() if finite.size else x_inf
        ax.set_xlim(lo_x / 1.6, x_inf * 1.6)
        ax.set(xlabel="privacy budget epsilon", title=_SPLIT_TITLES.get(split, str(split)))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    # One legend for all panels, below them, so it never hides a point.
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center",
               ncols=min(len(handles), 5), fontsize=8)
    return fig


def plot_fairness(df: pd.DataFrame, metric: str = "auroc", *, group_col: str = "group",
                  run_col: str = "run", spd_col: str = "spd") -> Figure:
    """Per-subgroup metric per run as a grouped bar chart, each bar annotated with its SPD.

    Args:
        df: Long table, one row per (run, subgroup): ``run_col``, ``group_col``, ``metric``
            and either ``spd_col`` or ``n`` (then Study B's SPD is computed per run with
            :func:`~mammodp.metrics.fairness.statistical_parity_difference`). Build it as
            ``pd.concat({run: subgroup_metrics(...) for ...}, names=["run"]).reset_index()``.
        metric: Column to plot (``"auroc"``, ``"auprc"``, ...).
        group_col: Subgroup column; categorical columns keep their category order.
        run_col: Column naming the run / regime / epsilon being compared.
        spd_col: SPD column to annotate (computed when absent).

    Returns:
        Figure with one axes holding one bar container per run (one bar per subgroup);
        a subgroup with a NaN metric gets an empty bar labelled "n/a".

    Raises:
        ValueError: Missing columns, empty table, or duplicate (run, subgroup) rows.
    """
    need = [run_col, group_col, metric]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"plot_fairness: columns {missing} missing (has {list(df.columns)})")
    if df.empty:
        raise ValueError("plot_fairness: empty table")
    dup = df.duplicated([run_col, group_col])
    if dup.any():
        raise ValueError(f"plot_fairness: {int(dup.sum())} duplicate ({run_col}, {group_col}) "
                         "row(s); aggregate over seeds first")
    data = df.copy()
    if spd_col not in data.columns:
        if "n" not in data.columns:
            raise ValueError(f"plot_fairness: need column {spd_col!r} or 'n' to compute SPD")
        data[spd_col] = np.nan
        for _, idx in data.groupby(run_col, sort=False).groups.items():
            data.loc[idx, spd_col] = statistical_parity_difference(data.loc[idx], metric).to_numpy()

    if isinstance(data[group_col].dtype, pd.CategoricalDtype):
        groups = [g for g in data[group_col].cat.categories if (data[group_col] == g).any()]
    else:
        groups = list(dict.fromkeys(data[group_col]))
    runs = list(dict.fromkeys(data[run_col]))
    x = np.arange(len(groups))
    width = 0.8 / len(runs)

    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(runs)) ** 0.5 + 2), 4.5),
                 layout="constrained")
    ax = fig.subplots()
    for i, run in enumerate(runs):
        part = data[data[run_col] == run].set_index(group_col)
        vals = np.array([float(part.at[g, metric]) if g in part.index else np.nan for g in groups])
        spds = np.array([float(part.at[g, spd_col]) if g in part.index else np.nan for g in groups])
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, np.nan_to_num(vals, nan=0.0),
                      width, label=str(run), color=f"C{i % 10}")
        notes = ["n/a" if np.isnan(v) else ("" if np.isnan(s) else f"{s:+.3f}")
                 for v, s in zip(vals, spds)]
        ax.bar_label(bars, labels=notes, fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, [str(g) for g in groups])
    ax.set_ylim(0, 1.15)  # room above the bars for the SPD labels
    ax.set(xlabel=group_col, ylabel=metric,
           title=f"{metric} by subgroup (bar labels: SPD vs weighted mean of other groups)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title=run_col)
    return fig
