"""Study B fairness definitions against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mammodp.metrics.classification import UndefinedMetricWarning
from mammodp.metrics.fairness import (
    age_bins,
    epsilon_spd_correlation,
    pairwise_parity_difference,
    statistical_parity_difference,
    subgroup_metrics,
)


def _three_groups() -> pd.DataFrame:
    rows = []
    # A: both malignant above both benign -> AUROC 1.
    rows += [("A", y, p) for y, p in zip([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])]
    # B: malignant .2 beats benign .1, loses to .3; malignant .4 beats both -> AUROC 3/4.
    rows += [("B", y, p) for y, p in zip([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4])]
    # C: every malignant below every benign -> AUROC 0.
    rows += [("C", y, p) for y, p in zip([1, 1, 1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])]
    return pd.DataFrame(rows, columns=["site", "label", "p_malignant"])


def test_subgroup_metrics_known_values():
    sub = subgroup_metrics(_three_groups(), "site")
    assert list(sub.index) == ["A", "B", "C"]
    assert sub["n"].tolist() == [4, 4, 6]
    assert sub["n_malignant"].tolist() == [2, 2, 3]
    assert sub["prevalence"].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert sub["auroc"].tolist() == pytest.approx([1.0, 0.75, 0.0])
    # AP for A is 1; for B: thresholds .4 (P=1, R=.5), .2 (P=2/3, R=1) -> .5 + .5*2/3.
    assert sub.loc["A", "auprc"] == pytest.approx(1.0)
    assert sub.loc["B", "auprc"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_spd_is_metric_minus_weighted_mean_of_other_groups():
    sub = subgroup_metrics(_three_groups(), "site")
    spd = statistical_parity_difference(sub, "auroc")
    assert spd.name == "spd_auroc"
    assert spd["A"] == pytest.approx(1.0 - (4 * 0.75 + 6 * 0.0) / 10)   # 0.7
    assert spd["B"] == pytest.approx(0.75 - (4 * 1.0 + 6 * 0.0) / 10)   # 0.35
    assert spd["C"] == pytest.approx(0.0 - (4 * 1.0 + 4 * 0.75) / 8)   # -0.875
    # An unweighted mean would give a different answer for A: 1 - (0.75 + 0) / 2 = 0.625.
    assert spd["A"] != pytest.approx(0.625)


def test_single_class_group_is_nan_and_skipped():
    df = pd.concat([_three_groups(),
                    pd.DataFrame({"site": ["D"] * 5, "label": [1] * 5,
                                  "p_malignant": [0.5] * 5})])
    with pytest.warns(UndefinedMetricWarning, match="'D'"):
        sub = subgroup_metrics(df, "site")
    assert np.isnan(sub.loc["D", "auroc"]) and sub.loc["D", "n"] == 5
    spd = statistical_parity_difference(sub, "auroc")
    assert np.isnan(spd["D"])
    # D's 5 samples do not enter the others' weighted means.
    assert spd["A"] == pytest.approx(0.7)


def test_two_group_spd_is_female_minus_male():
    df = pd.DataFrame({
        "sex": ["F"] * 4 + ["M"] * 6,
        "label": [0, 1, 0, 1] + [0, 0, 1, 1, 0, 1],
        "p_malignant": [0.1, 0.2, 0.3, 0.4] + [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    })
    sub = subgroup_metrics(df, "sex")
    # F: 3/4 (as B above). M: positives .3,.4,.6 vs negatives .1,.2,.5 -> 2+2+3 = 7/9.
    assert sub.loc["M", "auroc"] == pytest.approx(7 / 9)
    sex_spd = pairwise_parity_difference(sub, "auroc", "F", "M")
    assert sex_spd == pytest.approx(0.75 - 7 / 9)
    spd = statistical_parity_difference(sub, "auroc")
    assert spd["F"] == pytest.approx(sex_spd) and spd["M"] == pytest.approx(-sex_spd)
    with pytest.raises(ValueError, match="not in per-group table"):
        pairwise_parity_difference(sub, "auroc", "F", "X")


def test_missing_group_values_left_out_with_warning():
    df = _three_groups()
    df.loc[0, "site"] = None
    with pytest.warns(UserWarning, match="1 row"):
        sub = subgroup_metrics(df, "site")
    assert sub["n"].sum() == len(df) - 1
    with pytest.raises(ValueError, match="columns"):
        subgroup_metrics(df, "sex")


def test_age_bins_edges_half_open():
    ages = pd.Series([0, 29.9, 30, 59.99, 60, 69, 70, 80, 99.9, np.nan], index=list("abcdefghij"))
    bins = age_bins(ages)
    assert list(bins.index) == list("abcdefghij")
    assert bins.tolist() == ["[0,30)", "[0,30)", "[30,60)", "[30,60)", "[60,70)", "[60,70)",
                             "[70,80)", "[80,100)", "[80,100)", "unknown"]
    assert list(bins.cat.categories) == ["[0,30)", "[30,60)", "[60,70)", "[70,80)",
                                         "[80,100)", "unknown"]
    with pytest.warns(UserWarning, match="outside"):
        assert age_bins([100, -1, 45]).tolist() == ["unknown", "unknown", "[30,60)"]
    assert age_bins([5, 15], edges=(0, 10, 20)).tolist() == ["[0,10)", "[10,20)"]
    with pytest.raises(ValueError, match="increasing"):
        age_bins([40], edges=(0, 60, 30))


def test_age_bins_group_in_edge_order():
    df = pd.DataFrame({"age": [85, 85, 25, 25, 65, 65],
                       "label": [0, 1] * 3, "p_malignant": [0.2, 0.8] * 3})
    df["age_bin"] = age_bins(df["age"])
    sub = subgroup_metrics(df, "age_bin")
    assert list(sub.index) == ["[0,30)", "[60,70)", "[80,100)"]  # empty bins dropped


def test_epsilon_spd_pearson_matches_hand_computation():
    eps = [1, 6, 12, 20, 60]
    spd = [-0.10, -0.06, -0.05, -0.02, -0.03]
    records = [{"epsilon": e, "spd": s} for e, s in zip(eps, spd)]
    records.append({"epsilon": float("inf"), "spd": 0.5})   # non-private: excluded
    records.append({"epsilon": "inf", "spd": 0.4})          # as params.yaml spells it
    out = epsilon_spd_correlation(records)
    x, y = np.array(eps, float), np.array(spd)
    r = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(
        ((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    t = r * math.sqrt((len(x) - 2) / (1 - r * r))
    p = 2 * stats.t.sf(abs(t), len(x) - 2)
    assert out["n"] == 5 and out["reason"] is None
    assert out["r"] == pytest.approx(r) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert out["p_value"] == pytest.approx(p)
    assert epsilon_spd_correlation(pd.DataFrame(records))["r"] == pytest.approx(r)


def test_epsilon_spd_correlation_undefined_cases():
    few = epsilon_spd_correlation([{"epsilon": 1, "spd": 0.1}, {"epsilon": 6, "spd": 0.2},
                                   {"epsilon": float("inf"), "spd": 0.3}])
    assert math.isnan(few["r"]) and few["n"] == 2 and "at least 3" in few["reason"]
    const = epsilon_spd_correlation([{"epsilon": e, "spd": 0.1} for e in (1, 6, 12)])
    assert math.isnan(const["r"]) and math.isnan(const["p_value"]) and "constant" in const["reason"]
    with pytest.raises(ValueError, match="lacks"):
        epsilon_spd_correlation([{"epsilon": 1}])
