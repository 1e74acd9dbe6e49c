"""Empirical privacy audit: the one-run bound against reference figures, membership-inference
metrics, gradient canaries, power on a non-private canary model, bound <= claim under DP, and a
stage that fails when an accountant under-reports."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants import RDPAccountant

from mammodp.config import load_config
from mammodp.errors import PrivacyError
from mammodp.privacy import accountant as acc_mod
from mammodp.privacy import audit as A

# (m, r, v, significance, delta) -> epsilon lower bound. Reference figures of the maintained
# implementation named by the issue, jax-privacy 2.0.0 (`auditing._epsilon_one_run(0, m, r, v,
# significance, delta)`, which implements Steinke et al. 2023, Algorithm 2 with its delta term),
# computed in a separate venv (jax is not a dependency of this project).
JAX_PRIVACY_2_0_0 = {
    (1000, 100, 100, 0.05, 0.0): 3.492965346169885,
    (1000, 100, 100, 0.05, 1e-5): 3.465376229385333,
    (1000, 100, 90, 0.05, 1e-5): 1.6261436787042223,
    (1000, 500, 400, 0.05, 1e-5): 1.1979685996776859,
    (200, 50, 45, 0.05, 1e-4): 1.377089625582611,
    (64, 32, 32, 0.05, 1e-4): 2.3024869167071813,
    (100, 20, 15, 0.01, 1e-6): 0.0,
    (338, 40, 38, 0.05, 1e-4): 1.6943573168203045,
    (1000, 1000, 1000, 0.05, 1e-5): 5.782283131572193,
}
# jax-privacy 2.0.0 `_one_run_p_value(m, r, v, eps=1.0, delta)`.
JAX_P_VALUES = {(1000, 100, 90, 1e-5): 0.0008412885614385309, (200, 50, 45, 1e-4): 0.006124593655070254,
                (64, 10, 6, 1e-4): 0.898727814183405}


@pytest.mark.parametrize("case", sorted(JAX_PRIVACY_2_0_0))
def test_one_run_bound_matches_the_reference_implementation(case):
    assert A.one_run_epsilon(*case) == pytest.approx(JAX_PRIVACY_2_0_0[case], abs=2e-6)


@pytest.mark.parametrize("case", sorted(JAX_P_VALUES))
def test_one_run_p_value_matches_the_reference_implementation(case):
    m, r, v, delta = case
    assert A.one_run_p_value(m, r, v, 1.0, delta) == pytest.approx(JAX_P_VALUES[case], rel=1e-9)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_pure_dp_all_correct_has_the_closed_form_of_the_paper(r):
    # delta = 0, v = r: P[Binomial(r, q) >= r] = q^r = significance  =>  eps = logit(significance^(1/r)).
    q = 0.05 ** (1 / r)
    assert A.one_run_epsilon(2 * r, r, r, 0.05, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)


def test_p_value_grows_with_epsilon_and_delta_and_chance_guessing_proves_nothing():
    ps = [A.one_run_p_value(200, 50, 40, e, 1e-4) for e in (0.0, 0.5, 1.0, 2.0)]
    assert ps == sorted(ps) and A.one_run_p_value(200, 50, 40, 1.0, 1e-3) > A.one_run_p_value(200, 50, 40, 1.0, 0)
    assert A.one_run_epsilon(200, 50, 25, 0.05, 1e-4) == 0.0  # half right: chance
    with pytest.raises(PrivacyError):
        A.one_run_p_value(10, 5, 6, 1.0, 0.0)


def test_one_run_audit_guesses_the_top_scores_with_a_bonferroni_correction():
    rng = np.random.default_rng(7)
    ins, outs = rng.normal(1.0, 1, 50), rng.normal(0, 1, 50)
    scores, included = np.concatenate([ins, outs]), np.r_[np.ones(50, bool), np.zeros(50, bool)]
    # jax-privacy 2.0.0, Explicit(threshold=1.0): guess "in" for scores >= 1 (26 guesses, 20 right).
    assert A.one_run_epsilon(100, 26, 20, 0.05, 1e-4) == pytest.approx(0.37340891085685185, abs=1e-6)
    res = A.one_run_audit(scores, included, significance=0.05, delta=1e-4)
    assert res.hypotheses == 5 and res.m == 100 and res.included == 50
    order = np.argsort(-scores)
    assert res.correct == included[order[: res.guesses]].sum()
    assert res.epsilon == pytest.approx(A.one_run_epsilon(100, res.guesses, res.correct, 0.01, 1e-4))
    perfect = A.one_run_audit(np.r_[np.ones(32), np.zeros(32)], np.r_[np.ones(32, bool), np.zeros(32, bool)],
                              significance=0.05, delta=1e-4)
    assert perfect.guesses == 32 and perfect.correct == 32 and perfect.epsilon > 1.5


@pytest.mark.skipif(importlib.util.find_spec("jax_privacy") is None, reason="optional: pip install jax-privacy==2.0.0")
def test_one_run_bound_equals_jax_privacy_live():
    from jax_privacy import auditing

    rng = np.random.default_rng(3)
    ins, outs = rng.normal(1.5, 1, 200), rng.normal(0, 1, 200)
    for thr in (0.5, 1.5, 2.5):
        ref = auditing.CanaryScoreAuditor(ins, outs).epsilon_one_run(
            0.05, 1e-5, threshold_strategy=auditing.Explicit(thr))
        r, v = int((ins >= thr).sum() + (outs >= thr).sum()), int((ins >= thr).sum())
        assert A.one_run_epsilon(400, r, v, 0.05, 1e-5) == pytest.approx(ref, abs=1e-5)


def test_attack_metrics_against_direct_counts():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(1, 1, 300), rng.normal(0, 1, 1000)]
    member = np.r_[np.ones(300, bool), np.zeros(1000, bool)]
    res = A.attack_metrics(scores, member, (0.001, 0.01, 0.1))
    assert res.auroc == pytest.approx(roc_auc_score(member, scores)) and res.non_members == 1000
    for f, tpr in res.tpr_at_fpr.items():
        # The threshold that lets exactly floor(f * 1000) non-members through.
        k = int(math.floor(f * 1000 + 1e-9))
        thr = np.sort(scores[~member])[::-1][k] if k < 1000 else -np.inf
        assert tpr == pytest.approx(float((scores[member] > thr).mean()))
    with pytest.raises(PrivacyError):
        A.attack_metrics(scores[:10], np.ones(10, bool))


def test_lira_calibrates_per_example_difficulty_better_than_the_loss_attack():
    rng = np.random.default_rng(1)
    n, k = 400, 8
    difficulty = rng.normal(0, 3, n)  # per example: how confident any model is anyway

    def model_scores(member):
        return difficulty + 1.0 * member + rng.normal(0, 0.5, n)

    shadow_in = rng.random((k, n)) < 0.5
    shadow = np.stack([model_scores(m) for m in shadow_in])
    target_in = rng.random(n) < 0.5
    target = model_scores(target_in)
    lira = A.attack_metrics(A.lira_scores(target, shadow, shadow_in), target_in).auroc
    loss = A.attack_metrics(target, target_in).auroc
    assert lira > loss + 0.15 and lira > 0.8
    # With one shadow some examples lack an in (or out) fit: they borrow the mean gap, and still score.
    one = A.lira_scores(target, shadow[:1], shadow_in[:1])
    assert np.isfinite(one).all() and A.attack_metrics(one, target_in).auroc > 0.6


def _canary_model(m=6):
    from mammodp.models.swin import create_classifier

    torch.manual_seed(0)
    return A.DiracCanaryModel(create_classifier("swin_micro", mode="full"), m, scale=5.0)


def test_gradient_canaries_push_only_their_own_coordinate_and_hooks_equal_vmap():
    from mammodp.privacy.per_sample import per_sample_gradients

    model = _canary_model()
    real = torch.rand(3, 1, 64, 64)
    canaries = torch.from_numpy(A.dirac_canary_images(6, 64))[[1, 4]]
    x = torch.cat([real, canaries])
    y = torch.tensor([0, 1, 0, 1, 1])
    loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    hooks, _ = per_sample_gradients(model, loss, x, y, method="hooks")
    vmap, _ = per_sample_gradients(model, loss, x, y, method="vmap")
    for name in vmap:
        torch.testing.assert_close(hooks[name], vmap[name], rtol=1e-4, atol=1e-6, msg=name)
    w = vmap["canary.weight"][:, 0, :]  # (5 samples, 6 canaries)
    assert (w[:3] == 0).all()  # real patches never touch the canary coordinates
    assert (w[3].nonzero().flatten().tolist(), w[4].nonzero().flatten().tolist()) == ([1], [4])
    for name, g in vmap.items():  # and a canary touches nothing but its coordinate
        if name != "canary.weight":
            assert float(g[3:].abs().max()) == 0.0, name
    assert model(x).shape == (5, 2) and torch.isfinite(model(x)).all()


# --------------------------------------------------------------------------- canary models


def _project(tmp_path, n=24):
    """A tiny prepared CBIS manifest (train/val/test) and a config for the audit."""
    from mammodp.data.imageio import save_patch

    rng = np.random.default_rng(0)
    rows = []
    for split, k in (("train", n), ("val", 8), ("test", n // 2)):
        for i in range(k):
            label = i % 2
            yy, xx = np.mgrid[:32, :32]
            img = 0.3 + (0.4 if label else 0.2) * np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 60.0)
            img = np.clip(img + rng.normal(0, 0.05, (32, 32)), 0, 1)
            sid = f"{split}-{i}"
            save_patch(tmp_path / "prepared/cbis/patches" / f"{sid}.png", img)
            rows.append(dict(sample_id=sid, patient_id=f"P-{sid}", split=split, label=label,
                             pathology="MALIGNANT" if label else "BENIGN", image_path=f"patches/{sid}.png",
                             source="cbis-ddsm"))
    pd.DataFrame(rows).to_parquet(tmp_path / "prepared/cbis/manifest.parquet", index=False)
    cfg = load_config("params.yaml")
    return dataclasses.replace(
        cfg, experiment="test-audit", data=dataclasses.replace(cfg.data, prepared_dir=str(tmp_path / "prepared")),
        model=dataclasses.replace(cfg.model, pretrained_weights=None, mode="full"),  # no pretrain stage here
        train=dataclasses.replace(cfg.train, batch_size=16, lr=3e-3, device="cpu"),
        audit=dataclasses.replace(cfg.audit, epsilons=(2.0,), models=1, epochs=6, real_records=16, canaries=64))


@pytest.fixture
def audit_cfg(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # params.yaml of the repo
    torch.set_num_threads(1)
    return _project(tmp_path)


def test_power_on_a_non_private_canary_model_and_bound_below_claim_under_dp(audit_cfg):
    from mammodp.stages import audit

    cfg = audit_cfg
    real, _, _ = audit.audit_pool(cfg)
    plain = audit.train_audit_model(cfg, math.inf, 0, real, "cpu")
    power = A.one_run_audit(plain["dirac_scores"], plain["dirac_in"], significance=0.025, delta=cfg.dp.delta)
    # Without DP an excluded canary's coordinate never moves and an included one always does.
    assert (plain["dirac_scores"][~plain["dirac_in"]] == 0).all() and (plain["dirac_scores"][plain["dirac_in"]] > 0).all()
    assert power.epsilon > 1.0 and power.correct == min(power.guesses, power.included)

    private = audit.train_audit_model(cfg, 2.0, 0, real, "cpu")
    assert 0 < private["claimed"] <= 2.0 + 1e-9
    for scores, inc in ((private["dirac_scores"], private["dirac_in"]), (private["noise_loss"], private["noise_in"])):
        assert A.one_run_audit(scores, inc, significance=0.025, delta=cfg.dp.delta).epsilon <= private["claimed"]


class _UnderReportingRDP(RDPAccountant):
    """A broken accountant: reports a millionth of the true epsilon."""

    def get_epsilon(self, delta, alphas=None):
        return super().get_epsilon(delta=delta, alphas=list(range(2, 65))) / 1e6


def test_the_stage_fails_when_a_bound_exceeds_the_claim_and_logs_claim_and_bound(audit_cfg, tmp_path, monkeypatch):
    import mlflow

    from mammodp.models.swin import create_classifier
    from mammodp.inference import save_classifier
    from mammodp.stages import audit

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    torch.manual_seed(0)
    save_classifier(create_classifier("swin_micro", mode="full"),
                    {"preset": "swin_micro", "mode": "full", "patch_size": 32, "run_id": "r-inf", "epsilon": "inf"},
                    tmp_path / "models/real-inf/seed=0")
    (tmp_path / "promote.json").write_text(json.dumps({"aliases": {"eps-inf": {
        "run_id": "r-inf", "epsilon": "inf", "epsilon_total": "inf"}}}))
    paths = dict(models=tmp_path / "models", promoted=tmp_path / "promote.json", out=tmp_path / "audit.json",
                 report=tmp_path / "report.json", plots=tmp_path / "plots", device="cpu")

    monkeypatch.setitem(acc_mod.ACCOUNTANTS, "liar", _UnderReportingRDP)
    # Every record in every step (q = 1): an in-canary is pushed at each step, so even Adam's
    # normalised noise cannot hide it once the accountant's lie has removed almost all noise.
    lying = dataclasses.replace(audit_cfg, audit=dataclasses.replace(audit_cfg.audit, epsilons=(0.5,), epochs=12,
                                                                     accountant="liar"),
                                train=dataclasses.replace(audit_cfg.train, batch_size=1000))
    with pytest.raises(PrivacyError, match="INCONSISTENT"):
        audit.run(lying, **paths)
    numbers = json.loads((tmp_path / "audit.json").read_text())  # written before failing
    assert numbers["consistent"] == 0 and numbers["eps_0_5/bound_whitebox"] > numbers["eps_0_5/claimed"]
    assert all(isinstance(v, (int, float)) for v in numbers.values()) and len(numbers) <= 60
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["has_power"] and "loss_attack" in report["promoted"]["eps-inf"]
    assert (tmp_path / "plots/claim_vs_bound.png").is_file()
    run = mlflow.search_runs(experiment_names=["test-audit"], filter_string="tags.stage = 'audit'",
                             output_format="list")[0]
    assert run.data.tags["audit_consistent"] == "false"
    assert run.data.metrics["eps_0_5/claimed"] < run.data.metrics["eps_0_5/bound_whitebox"]
    assert "audit/claim_vs_bound.png" in {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "audit")}
