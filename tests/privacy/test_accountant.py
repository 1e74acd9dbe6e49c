"""Accounting: calibration reproduces the paper and Opacus, epsilon matches an independent
RDP computation, PRV failures fall back to RDP and say so, state survives a resume."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from mammodp.errors import ConfigError, PrivacyError
from mammodp.privacy import accountant as acc_mod
from mammodp.privacy.accountant import calibrate_noise, make_accountant

# Paper (Osuala et al. 2024): RDP, delta 1e-4, 300 epochs at q = 1/9 (2,700 steps).
PAPER_SIGMAS = {1: 20.3, 6: 4.34, 12: 2.54, 20: 1.78, 60: 0.96}


@pytest.mark.parametrize("eps", sorted(PAPER_SIGMAS))
def test_calibration_reproduces_the_papers_noise_multipliers(eps):
    sigma = calibrate_noise(eps, 1e-4, 1 / 9, 2700, "rdp")
    assert sigma == pytest.approx(PAPER_SIGMAS[eps], rel=0.02)


def test_calibration_equals_opacus_get_noise_multiplier():
    for eps, q, steps in [(6.0, 1 / 9, 2700), (1.0, 0.05, 400), (3.0, 0.2, 50)]:
        ours = calibrate_noise(eps, 1e-5, q, steps, "rdp")
        theirs = get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps,
                                      accountant="rdp")
        assert ours == theirs
        a = make_accountant("rdp")
        for _ in range(steps):
            a.step(noise_multiplier=ours, sample_rate=q)
        assert eps - 0.01 <= a.epsilon(1e-5) <= eps


@pytest.mark.parametrize("q", [0.0, 128 / 55, -0.1])
def test_calibration_refuses_a_sample_rate_outside_0_1(q):
    # q > 1 (a batch larger than the data) once surfaced as "rdp raised ValueError: math domain error".
    with pytest.raises(PrivacyError, match="sample rate must be in") as err:
        calibrate_noise(6.0, 1e-4, q, 10, "rdp")
    assert err.value.field == "train.batch_size"


def _independent_rdp_epsilon(history, delta):
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def test_epsilon_equals_an_independent_rdp_computation():
    a = make_accountant("rdp")
    assert a.epsilon(1e-4) == 0.0
    for _ in range(30):
        a.step(noise_multiplier=1.1, sample_rate=0.05)
    for _ in range(20):
        a.step(noise_multiplier=2.0, sample_rate=0.1)
    assert a.history == [(1.1, 0.05, 30), (2.0, 0.1, 20)] and a.steps == 50
    expected = _independent_rdp_epsilon([(1.1, 0.05, 30), (2.0, 0.1, 20)], 1e-4)
    assert a.epsilon(1e-4) == pytest.approx(expected, rel=1e-12)
    assert a.mechanism == "rdp" and a.fallback_reason is None


def test_prv_is_tighter_than_rdp_for_the_same_steps():
    prv, rdp = make_accountant("prv"), make_accountant("rdp")
    for a in (prv, rdp):
        for _ in range(100):
            a.step(noise_multiplier=1.0, sample_rate=0.05)
    assert 0 < prv.epsilon(1e-5) < rdp.epsilon(1e-5)
    assert prv.mechanism == "prv" and prv.fallback_reason is None


def test_unknown_accountant_names_the_choices():
    with pytest.raises(ConfigError) as err:
        make_accountant("gdp-ish")
    assert "prv" in str(err.value) and "rdp" in str(err.value)


class _Raises(RDPAccountant):
    """An accountant whose numerics fail, as PRV's have for large epsilon."""

    def get_epsilon(self, delta, *args, **kwargs):
        raise MemoryError("domain too large")


class _NaN(RDPAccountant):
    def get_epsilon(self, delta, *args, **kwargs):
        return float("nan")


class _Inf(RDPAccountant):
    def get_epsilon(self, delta, *args, **kwargs):
        return math.inf


@pytest.mark.parametrize("broken", [_Raises, _NaN])
def test_failing_calibration_falls_back_to_rdp_and_records_it(monkeypatch, broken):
    monkeypatch.setitem(acc_mod.ACCOUNTANTS, "fragile", broken)
    a = make_accountant("fragile")
    sigma = calibrate_noise(6.0, 1e-4, 1 / 9, 2700, a)
    assert sigma == calibrate_noise(6.0, 1e-4, 1 / 9, 2700, "rdp")
    assert a.mechanism == "rdp" and a.requested == "fragile"
    assert a.fallback_reason and "fragile -> rdp" in a.fallback_reason


@pytest.mark.parametrize("broken", [_Raises, _NaN, _Inf])
def test_failing_epsilon_falls_back_to_rdp_and_records_it(monkeypatch, broken):
    monkeypatch.setitem(acc_mod.ACCOUNTANTS, "fragile", broken)
    a = make_accountant("fragile")
    for _ in range(10):
        a.step(noise_multiplier=1.0, sample_rate=0.1)
    eps = a.epsilon(1e-5)
    assert eps == pytest.approx(_independent_rdp_epsilon([(1.0, 0.1, 10)], 1e-5))
    assert a.mechanism == "rdp" and a.fallback_reason
    state = a.state_dict()
    assert state["fallback_reason"] == a.fallback_reason and state["mechanism"] == "rdp"


def test_state_is_plain_data_and_resumes_the_same_epsilon():
    a = make_accountant("prv")
    for _ in range(40):
        a.step(noise_multiplier=1.3, sample_rate=0.02)
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON, not only pickle
    b = make_accountant("prv")
    b.load_state_dict(state)
    assert b.history == a.history
    assert b.epsilon(1e-5) == a.epsilon(1e-5)
    with pytest.raises(PrivacyError):
        make_accountant("rdp").load_state_dict(state)


def test_impossible_budget_is_a_privacy_error():
    with pytest.raises(PrivacyError):
        calibrate_noise(1e-6, 1e-10, 1.0, 100_000, "rdp")
    with pytest.raises(PrivacyError):
        calibrate_noise(math.inf, 1e-5, 0.1, 10, "rdp")


def test_integer_order_rdp_is_an_upper_bound_close_to_rdp():
    history = [(1.58, 0.25, 60), (1.1, 0.05, 300)]
    fast, full = make_accountant("rdp_int"), make_accountant("rdp")
    fast.history = full.history = history
    assert full.epsilon(1e-4) <= fast.epsilon(1e-4) <= 1.05 * full.epsilon(1e-4)
    assert fast.epsilon(1e-4) == pytest.approx(_independent_rdp_epsilon_at(history, 1e-4, range(2, 65)), rel=1e-12)
    sigma = calibrate_noise(6.0, 1e-4, 0.25, 60, "rdp_int")
    fast = make_accountant("rdp_int")
    fast.history = [(sigma, 0.25, 60)]
    assert 6.0 - 0.01 <= fast.epsilon(1e-4) <= 6.0


def _independent_rdp_epsilon_at(history, delta, orders):
    orders = list(orders)
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


# Histories a run meets: one (sigma, q) for many epochs, a tuned sigma, a change of q mid-run
# (GAN warm start + DP, composed generator + classifier), and the paper's 2,700 steps.
CACHE_HISTORIES = [
    [(1.1, 0.05, 30)],
    [(0.7, 0.0338, 887)],
    [(1.1, 0.05, 30), (2.0, 0.1, 20)],
    [(4.34, 1 / 9, 2700)],
    [(0.96, 1 / 9, 2700), (1.5, 0.02, 5)],
]


@pytest.mark.parametrize("history", CACHE_HISTORIES)
def test_cached_accountants_equal_opacus_bit_for_bit(history):
    from opacus.accountants import PRVAccountant

    for cached, opacus_cls in ((acc_mod.CachedRDPAccountant, RDPAccountant),
                               (acc_mod.CachedPRVAccountant, PRVAccountant)):
        for delta in (1e-4, 1e-6):
            ours, theirs = cached(), opacus_cls()
            ours.history, theirs.history = list(history), list(history)
            # Twice: the second call is served from the cache and must not drift.
            assert ours.get_epsilon(delta) == theirs.get_epsilon(delta) == ours.get_epsilon(delta)


def test_registered_accountants_are_the_cached_ones_and_per_epoch_calls_are_cheap():
    import time

    assert acc_mod.ACCOUNTANTS["rdp"] is acc_mod.CachedRDPAccountant
    assert acc_mod.ACCOUNTANTS["prv"] is acc_mod.CachedPRVAccountant
    acc_mod._rdp_per_step.cache_clear()
    a = make_accountant("prv")
    for epoch in range(5):  # 5 "epochs" of 30 steps, epsilon after each, as training.fit does
        for _ in range(30):
            a.step(noise_multiplier=1.3, sample_rate=0.034)
        a.epsilon(1e-4)
    info = acc_mod._rdp_per_step.cache_info()
    # One (q, sigma) -> one per-step vector, reused by every later call (no timing asserted).
    assert info.misses == 1 and info.hits >= 2 * 5 - 1
