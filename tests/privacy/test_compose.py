"""End-to-end epsilon: the classifier's and the generator's mechanisms composed over the same records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from mammodp.errors import PrivacyError
from mammodp.privacy import compose as C
from mammodp.privacy import make_private

CLASSIFIER = [(1.1, 0.05, 300)]  # sigma, q, steps
GENERATOR = [(0.72, 8 / 274, 680)]  # the demo MCGAN at gan.dp.epsilon = 10
DELTA = 1e-4
# Google dp-accounting 0.6.0 (an independent implementation), same mechanisms, delta 1e-4:
# RDP accountant over Opacus' orders, and PLD (tighter; PRV should agree with it).
DP_ACCOUNTING_RDP = {"classifier": 4.640733089550595, "generator": 10.078211604741904, "both": 11.294881876748427}
DP_ACCOUNTING_PLD = {"classifier": 4.10296068636898, "generator": 8.790388665702253, "both": 9.966423694946446}


def _opacus_rdp(history, delta):
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def test_rdp_composition_equals_independent_compositions_and_exceeds_each_part():
    total, used, fallback = C.compose([CLASSIFIER, GENERATOR], DELTA, "rdp")
    assert used == "rdp" and fallback == ""
    assert total == pytest.approx(_opacus_rdp(CLASSIFIER + GENERATOR, DELTA), rel=1e-12)
    assert total == pytest.approx(DP_ACCOUNTING_RDP["both"], rel=1e-2)
    parts = [C.compose([h], DELTA, "rdp")[0] for h in (CLASSIFIER, GENERATOR)]
    assert parts[0] == pytest.approx(DP_ACCOUNTING_RDP["classifier"], rel=1e-3)
    assert max(parts) < total < sum(parts)  # composed, not the loose sum


def test_prv_composition_equals_opacus_prv_and_agrees_with_pld():
    total, used, _ = C.compose([CLASSIFIER, GENERATOR], DELTA, "prv")
    acc = PRVAccountant()
    acc.history = CLASSIFIER + GENERATOR
    assert used == "prv" and total == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert DP_ACCOUNTING_PLD["both"] * 0.99 <= total <= DP_ACCOUNTING_PLD["both"] * 1.02
    assert total >= C.compose([GENERATOR], DELTA, "prv")[0]


def _summary(steps=40, sigma=1.1, q=0.1, accountant="rdp"):
    """A real engine's summary after `steps` private steps."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n = int(round(1 / q)) * 4
    dp = make_private(model, opt, record_ids=np.arange(n), expected_batch_size=q * n, delta=DELTA, epochs=1,
                      max_grad_norm=1.0, noise_multiplier=sigma, accountant=accountant, sampler_seed=0)
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    for _ in range(steps):
        idx = dp.sample_batch()
        dp.step(x[idx], y[idx], torch.nn.CrossEntropyLoss(), record_idx=idx)
    return dp.summary()


def _generator_record(history=GENERATOR, unit="patch"):
    return {"dp": True, "epsilon": C.compose([history], 1e-3, "rdp")[0], "delta": 1e-3, "privacy_unit": unit,
            "accountant_state": {"requested": "rdp", "mechanism": "rdp", "fallback_reason": None,
                                 "history": [list(h) for h in history]}}


def test_end_to_end_composes_the_runs_history_with_the_generators():
    summary = _summary()
    e2e = C.end_to_end(summary, delta=DELTA, privacy_unit="patch", accountant="rdp",
                       generator=_generator_record(), synthetic_used=True)
    history = C.history_from_summary(summary)
    assert history == [(1.1, 0.1, 40)]
    assert e2e.status == "covered" and e2e.method == "rdp"
    assert e2e.epsilon_total == pytest.approx(_opacus_rdp(history + GENERATOR, DELTA), rel=1e-12)
    assert e2e.epsilon_total >= max(summary["epsilon"], C.compose([GENERATOR], DELTA, "rdp")[0])
    assert e2e.parts["classifier"] == summary["epsilon"]
    assert not e2e.within(6.0) and e2e.within(e2e.epsilon_total) and e2e.within(math.inf)
    assert "RDP composition" in e2e.statement() and e2e.text == f"{e2e.epsilon_total:.6g}"


def test_one_mechanism_keeps_its_own_figure_and_synthetic_only_uses_the_generators():
    summary = _summary(accountant="prv")
    alone = C.end_to_end(summary, delta=DELTA, privacy_unit="patch", accountant="prv")
    assert alone.epsilon_total == summary["epsilon"] and alone.method == "prv"
    synth_only = C.end_to_end(None, delta=DELTA, privacy_unit="patch", accountant="rdp",
                              generator=_generator_record(), synthetic_used=True)
    assert synth_only.epsilon_total == pytest.approx(_opacus_rdp(GENERATOR, DELTA), rel=1e-12)  # at the run's delta


def test_not_covered_and_non_private_have_no_finite_total():
    summary = _summary()
    nondp = C.end_to_end(summary, delta=DELTA, privacy_unit="patch", accountant="rdp",
                         generator={"dp": False, "epsilon": "non-private"}, synthetic_used=True)
    assert nondp.epsilon_total is None and nondp.text == "not_covered" and "WITHOUT DP" in nondp.reason
    assert not nondp.within(1e9) and nondp.within(math.inf)
    other_unit = C.end_to_end(summary, delta=DELTA, privacy_unit="patient", accountant="rdp",
                              generator=_generator_record(unit="patch"), synthetic_used=True)
    assert other_unit.status == "not_covered" and "privacy unit" in other_unit.reason
    missing = C.end_to_end(summary, delta=DELTA, privacy_unit="patch", accountant="rdp", synthetic_used=True)
    assert missing.status == "not_covered"
    no_history = C.end_to_end(summary, delta=DELTA, privacy_unit="patch", accountant="rdp", synthetic_used=True,
                              generator={"dp": True, "epsilon": 3.0, "delta": 1e-3, "privacy_unit": "patch"})
    assert no_history.status == "not_covered" and "accountant history" in no_history.reason
    nonpriv = C.end_to_end(None, delta=DELTA, privacy_unit="patch", accountant="rdp", real_without_dp=True)
    assert nonpriv.epsilon_total == math.inf and nonpriv.text == "inf" and not nonpriv.within(60.0)


def test_a_summary_whose_epsilon_does_not_follow_from_its_history_is_refused():
    summary = dict(_summary(), epsilon=0.5)
    with pytest.raises(PrivacyError, match="does not follow"):
        C.history_from_summary(summary)


def test_served_epsilon_is_the_total_or_not_covered():
    assert C.served_epsilon({"epsilon": 0.9, "epsilon_total": 7.5}) == 7.5
    assert C.served_epsilon({"epsilon": 0.9, "epsilon_total": "not_covered"}) == "not_covered"
    assert C.served_epsilon({"epsilon": "inf", "epsilon_total": "inf"}) == math.inf
    # Saved before end-to-end accounting: own epsilon only when no synthetic data was used.
    assert C.served_epsilon({"epsilon": 0.9, "synthetic_privacy": "none"}) == 0.9
    assert C.served_epsilon({"epsilon": 0.9, "synthetic_privacy": "dp(eps=9.9)"}) == "not_covered"
