"""Plots return Figures with the expected structure and save to PNG."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from sklearn import metrics as skm

from mammodp.metrics.fairness import statistical_parity_difference, subgroup_metrics
from mammodp.metrics.plots import curve_records, plot_fairness, plot_pr_roc, plot_privacy_utility

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _yp(n: int, seed: int, prevalence: float = 0.4):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    return y, p


def _save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_pr_roc_structure(tmp_path):
    curves = {"internal": _yp(120, 0, 0.4), "external": _yp(100, 1, 0.45)}
    fig = plot_pr_roc(curves)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    ax_pr, ax_roc = fig.axes
    # One curve each + one chance line per distinct prevalence / the ROC diagonal.
    prevalences = {round(float(y.mean()), 3) for y, _ in curves.values()}
    assert len(ax_pr.lines) == 2 + len(prevalences)
    assert len(ax_roc.lines) == 2 + 1
    chance = [ln for ln in ax_pr.lines if ln.get_label().startswith("chance")]
    assert sorted(round(ln.get_ydata()[0], 3) for ln in chance) == sorted(prevalences)
    y, p = curves["internal"]
    legend = [t.get_text() for t in ax_roc.get_legend().get_texts()]
    assert f"internal (AUROC={skm.roc_auc_score(y, p):.3f})" in legend
    legend_pr = [t.get_text() for t in ax_pr.get_legend().get_texts()]
    assert f"internal (AP={skm.average_precision_score(y, p):.3f})" in legend_pr
    _save(fig, tmp_path / "pr_roc.png")
    with pytest.raises(ValueError, match="both classes"):
        plot_pr_roc({"bad": ([1, 1], [0.2, 0.3])})


def _utility_table() -> pd.DataFrame:
    rows = []
    for split, shift in (("internal", 0.0), ("external", -0.05)):
        for regime, base in (("real", 0.55), ("real+synth", 0.6), ("synth-pretrain", 0.65)):
            for eps in (1, 6, 12, 20, 60, float("inf")):
                v = base + shift + (0.15 if np.isinf(eps) else 0.02 * np.log(eps))
                rows.append({"regime": regime, "epsilon": eps, "split": split, "auprc": v,
                             "ci_low": v - 0.05, "ci_high": v + 0.05, "prevalence": 0.39})
    return pd.DataFrame(rows)


def test_plot_privacy_utility_structure(tmp_path):
    df = _utility_table()
    fig = plot_privacy_utility(df)
    assert len(fig.axes) == 2
    titles = [ax.get_title() for ax in fig.axes]
    assert "internal" in titles[0] and "external" in titles[1]
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["1", "6", "12", "20", "60", "inf\n(non-private)"]
        # Rightmost tick (inf) lies beyond the largest finite budget.
        assert ax.get_xticks()[-1] > 60
        # One line per regime over finite budgets, with 5 points each.
        regime_lines = [ln for ln in ax.lines if ln.get_label() in {"real", "real+synth",
                                                                     "synth-pretrain"}]
        assert len(regime_lines) == 3 and all(len(ln.get_xdata()) == 5 for ln in regime_lines)
        assert len(ax.collections) >= 3  # CI bands
        assert len(ax.containers) == 3   # inf points with error bars
    _save(fig, tmp_path / "privacy_utility.png")

    # Strings "inf" (params.yaml spelling) work; a single split gives a single panel.
    one = df[df["split"] == "internal"].assign(epsilon=lambda d: d["epsilon"].map(
        lambda e: "inf" if np.isinf(e) else e))
    assert len(plot_privacy_utility(one).axes) == 1
    with pytest.raises(ValueError, match="ci_low"):
        plot_privacy_utility(df.drop(columns="ci_low"))


def test_plot_privacy_utility_marks_points_not_covered_end_to_end():
    df = _utility_table()
    df["covered"] = ~((df["regime"] == "synth-pretrain") & np.isfinite(df["epsilon"]))
    fig = plot_privacy_utility(df)
    for ax in fig.axes:
        hollow = [c for c in ax.collections if c.get_label() == "not covered end to end (hollow)"]
        assert len(hollow) == 1 and len(hollow[0].get_offsets()) == 5  # the 5 finite budgets of that regime
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "not covered end to end (hollow)" in legend
    assert not any(c.get_label().startswith("not covered") for ax in plot_privacy_utility(
        df.drop(columns="covered")).axes for c in ax.collections)


def _fairness_table() -> pd.DataFrame:
    rng = np.random.default_rng(4)
    tables = {}
    for run in ("eps=1", "eps=inf"):
        n = 300
        df = pd.DataFrame({"group": rng.choice(["[30,60)", "[60,70)", "[70,80)"], n),
                           "label": rng.integers(0, 2, n)})
        df["p_malignant"] = np.clip(0.3 * df["label"] + 0.7 * rng.random(n), 0, 1)
        sub = subgroup_metrics(df, "group")
        tables[run] = sub.assign(spd=statistical_parity_difference(sub, "auroc"))
    return pd.concat(tables, names=["run"]).reset_index()


def test_plot_fairness_structure(tmp_path):
    table = _fairness_table()
    fig = plot_fairness(table, "auroc")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2 and all(len(b) == 3 for b in bars)
    heights = sorted(round(r.get_height(), 6) for b in bars for r in b)
    assert heights == sorted(round(v, 6) for v in table["auroc"])
    # SPD labels are written on the bars.
    texts = {t.get_text() for t in ax.texts}
    assert {f"{s:+.3f}" for s in table["spd"]} <= texts
    _save(fig, tmp_path / "fairness.png")
    # Without an spd column it is computed from n, with the same annotations.
    fig2 = plot_fairness(table.drop(columns="spd"), "auroc")
    assert {t.get_text() for t in fig2.axes[0].texts} == texts
    with pytest.raises(ValueError, match="duplicate"):
        plot_fairness(pd.concat([table, table]))


def test_curve_records_for_dvc_plots():
    y, p = _yp(50, 7)
    pr = curve_records(y, p)
    precision, recall, _ = skm.precision_recall_curve(y, p)
    assert [r["precision"] for r in pr] == pytest.approx(precision.tolist())
    assert [r["recall"] for r in pr] == pytest.approx(recall.tolist())
    assert pr[-1]["threshold"] is None
    roc = curve_records(y, p, kind="roc")
    fpr, tpr, _ = skm.roc_curve(y, p)
    assert [r["fpr"] for r in roc] == pytest.approx(fpr.tolist())
    assert set(roc[0]) == {"fpr", "tpr", "threshold"}
    json.dumps({"pr": pr, "roc": roc}, allow_nan=False)  # valid strict JSON
    with pytest.raises(ValueError, match="kind"):
        curve_records(y, p, kind="det")
