"""Privacy accounting: Opacus' RDP and PRV accountants behind one small interface.

- `make_accountant(name)` builds a `PrivacyAccountant` from the registry `ACCOUNTANTS`.
- `calibrate_noise(...)` finds the smallest noise multiplier that meets a budget.
- PRV is tighter than RDP but numerically fragile (it has failed for large epsilon in
  some Opacus versions, raising, returning NaN or infinity). When it fails the accountant
  falls back to RDP for good, and records why in `fallback_reason`; the training stage
  logs that beside epsilon.
- The state (`history` of (noise multiplier, sample rate, steps) runs, the mechanism
  actually used, the fallback) serialises to a plain dict, so a resumed run reports the
  same epsilon as an uninterrupted one.
- Per-epoch reporting asks for epsilon after every epoch of a run whose (sigma, q) never
  changes. Opacus recomputes the per-step Renyi divergences of the subsampled Gaussian
  at every order each time (PRV does so twice, to size its discretisation domain): ~0.25 s
  a call, a third of a short DP run on CPU. They depend on (q, sigma, order) alone, so the
  registered accountants cache them (`_rdp_per_step`) and multiply by the step count, as
  Opacus does: the same numbers, bit for bit (tests/privacy/test_accountant.py).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain

from mammodp.errors import ConfigError, PrivacyError

@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of ONE step of the Poisson-subsampled Gaussian at each order (read-only array)."""
    rdp = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                              orders=list(orders)), dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


class CachedRDPAccountant(RDPAccountant):
    """Opacus' RDP accountant with the per-step divergences cached (`_rdp_per_step`)."""

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
        if not self.history:
            return 0, 0
        orders = tuple(alphas if alphas is not None else self.DEFAULT_ALPHAS)
        # Opacus: compute_rdp(steps=n) is the one-step vector times n, summed over the history.
        rdp = sum([_rdp_per_step(q, sigma, orders) * n for sigma, q, n in self.history])
        eps, best_alpha = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
        return float(eps), float(best_alpha)


class CachedPRVAccountant(PRVAccountant):
    """Opacus' PRV accountant whose domain sizing (Gopi et al., remark 5.6: two RDP bounds)
    uses the cached RDP accountant; discretisation and composition are Opacus' own."""

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        # Opacus 1.6's compute_safe_domain_size, with CachedRDPAccountant in place of RDPAccountant.
        # These RDP bounds only size the grid (any upper bound will do), so Opacus' advice to
        # widen the orders when the best one is the largest is noise here: silenced (it came
        # once per epoch of every DP run).
        total = sum(num_self_compositions)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
            rdp = CachedRDPAccountant()
            rdp.history = [(prv.noise_multiplier, prv.sample_rate, n) for prv, n in zip(prvs, num_self_compositions)]
            size = rdp.get_epsilon(delta_error / 4)
            for prv in prvs:
                one = CachedRDPAccountant()
                one.history = [(prv.noise_multiplier, prv.sample_rate, 1)]
                size = max(size, one.get_epsilon(delta=delta_error / (8 * total)))
        half_width = max(size, eps_error) + 3
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-half_width, half_width, mesh_size)


class IntegerOrderRDPAccountant(CachedRDPAccountant):
    """RDP over the integer orders 2..64 only: Opacus' closed form for integer orders is ~30x
    faster than its fractional orders, at a slightly looser epsilon (a valid upper bound).
    Meant for many short runs (the audit's canary models), where accounting would dominate."""

    ORDERS = tuple(range(2, 65))

    def get_epsilon(self, delta: float, alphas=None) -> float:
        return super().get_epsilon(delta=delta, alphas=list(alphas or self.ORDERS))


# name -> Opacus accountant class (a dict, as in Opacus' own registry). Tests may add
# entries (e.g. an accountant that always fails) to exercise the fallback.
ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": CachedRDPAccountant, "prv": CachedPRVAccountant,
                                             "rdp_int": IntegerOrderRDPAccountant}
FALLBACK = "rdp"  # the robust mechanism every other accountant falls back to
MAX_SIGMA = 1e6  # Opacus' limit in get_noise_multiplier: beyond it the budget is "too low"


class AccountantFailure(RuntimeError):
    """An accountant raised or returned a non-number (NaN) for epsilon."""


def _epsilon_of(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of `history` under `mechanism`; raises AccountantFailure on errors or NaN."""
    acc = ACCOUNTANTS[mechanism]()
    acc.history = [tuple(h) for h in history]
    try:
        eps = float(acc.get_epsilon(delta=delta))
    except Exception as exc:  # any failure inside the numerics (ValueError, MemoryError, ...)
        raise AccountantFailure(f"{mechanism} raised {type(exc).__name__}: {exc}") from exc
    if math.isnan(eps):
        raise AccountantFailure(f"{mechanism} returned NaN")
    return eps


class PrivacyAccountant:
    """Tracks the (noise multiplier, sample rate) of every step and reports epsilon.

    Attributes:
        requested: the mechanism asked for (`prv`, `rdp`).
        mechanism: the mechanism in use (differs from `requested` after a fallback).
        fallback_reason: None, or why the requested mechanism was abandoned.
        history: [(noise_multiplier, sample_rate, steps)] runs, as in Opacus.
    """

    def __init__(self, name: str):
        if name not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {name!r}; known: {', '.join(sorted(ACCOUNTANTS))}",
                              field="dp.accountant")
        self.requested = name
        self.mechanism = name
        self.fallback_reason: str | None = None
        self.history: list[tuple[float, float, int]] = []
        self._cache: tuple[Any, float] | None = None

    def fall_back(self, reason: str) -> None:
        """Switch to RDP for good and record why."""
        self.mechanism = FALLBACK
        self.fallback_reason = f"{self.requested} -> {FALLBACK}: {reason}"
        self._cache = None

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step (run-length encoded like Opacus' history)."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + 1)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), 1))

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (0 before the first step).

        Falls back to RDP (recording why) if the current mechanism raises, returns NaN,
        or returns infinity where RDP gives a finite bound.
        """
        if not self.history:
            return 0.0
        key = (tuple(self.history), delta, self.mechanism)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            eps = _epsilon_of(self.mechanism, self.history, delta)
            if math.isinf(eps) and self.mechanism != FALLBACK:
                rdp = _epsilon_of(FALLBACK, self.history, delta)
                if math.isfinite(rdp):
                    raise AccountantFailure(f"{self.mechanism} returned inf where {FALLBACK} gives {rdp:.4g}")
        except AccountantFailure as exc:
            if self.mechanism == FALLBACK:
                raise PrivacyError(f"privacy accounting failed: {exc}", field="dp.accountant") from exc
            self.fall_back(str(exc))
            eps = _epsilon_of(FALLBACK, self.history, delta)
        self._cache = ((tuple(self.history), delta, self.mechanism), eps)
        return eps

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (history, mechanism, fallback) for checkpoints."""
        return {
            "requested": self.requested,
            "mechanism": self.mechanism,
            "fallback_reason": self.fallback_reason,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`.

        Raises:
            PrivacyError: the state was made for another requested accountant.
        """
        if state["requested"] != self.requested:
            raise PrivacyError(
                f"checkpoint used accountant {state['requested']!r}, this run asks for {self.requested!r}",
                field="dp.accountant")
        self.mechanism = state["mechanism"]
        self.fallback_reason = state["fallback_reason"]
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self._cache = None


def make_accountant(name: str) -> PrivacyAccountant:
    """A fresh accountant by name (a key of `ACCOUNTANTS`).

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    return PrivacyAccountant(name)


def _search_sigma(mechanism: str, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  tolerance: float) -> float:
    """Opacus' `get_noise_multiplier` bisection, for any registered mechanism."""
    def eps_at(sigma: float) -> float:
        return _epsilon_of(mechanism, [(sigma, sample_rate, steps)], delta)

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        eps_high = eps_at(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise PrivacyError(
                f"budget epsilon={target_epsilon} at delta={delta} is too low for {steps} steps at q={sample_rate:.4g}",
                field="epsilon")
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = eps_at(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str | PrivacyAccountant = "rdp",
    *,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier sigma (to within the tolerance) with epsilon <= target.

    Same bisection as Opacus' `get_noise_multiplier` (its results are reproduced exactly
    for `rdp`). If the mechanism fails (PRV raising / NaN), calibration is redone with RDP
    and the fallback is recorded on `accountant` when an accountant object is passed.

    Args:
        target_epsilon: budget epsilon (> 0, finite).
        delta: budget delta.
        sample_rate: Poisson sampling rate q.
        steps: number of logical steps the run will take.
        accountant: a mechanism name or a `PrivacyAccountant` (which records a fallback).
        epsilon_tolerance: stop when target - epsilon(sigma) <= this.

    Returns:
        The noise multiplier.

    Raises:
        PrivacyError: the budget cannot be met (sigma would exceed 1e6) or is not finite, or
            the sample rate is outside (0, 1].
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"cannot calibrate noise to epsilon={target_epsilon}", field="epsilon")
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate must be in (0, 1], got {sample_rate:.4g} (a batch larger than the "
                           "data?)", field="train.batch_size")
    acc = make_accountant(accountant) if isinstance(accountant, str) else accountant
    try:
        return _search_sigma(acc.mechanism, target_epsilon, delta, sample_rate, steps, epsilon_tolerance)
    except AccountantFailure as exc:
        if acc.mechanism == FALLBACK:
            raise PrivacyError(f"noise calibration failed: {exc}", field="dp.accountant") from exc
        acc.fall_back(f"calibration failed: {exc}")
        return _search_sigma(FALLBACK, target_epsilon, delta, sample_rate, steps, epsilon_tolerance)


__all__ = [
    "ACCOUNTANTS",
    "FALLBACK",
    "AccountantFailure",
    "CachedPRVAccountant",
    "CachedRDPAccountant",
    "IntegerOrderRDPAccountant",
    "PrivacyAccountant",
    "calibrate_noise",
    "make_accountant",
]
