"""End-to-end epsilon: one guarantee over every mechanism that touched the same private records.

A classifier trained with synthetic data from a DP generator has touched the CBIS training
records twice: once through the generator's DP-SGD (on the MCGAN discriminator; the
generator is post-processing of it) and once through its own DP-SGD. Its guarantee is the
composition of the two mechanisms, not either part:

- the two accountant histories ((noise multiplier, sample rate, steps) runs of subsampled
  Gaussian steps) are joined into one heterogeneous history and handed to one accountant:
  RDP adds the Renyi divergences order by order, PRV composes the privacy random variables;
  both take mixed histories (Opacus' accountants accept any list of runs);
- the total is read at ONE delta, the classifier run's (`dp.delta`): each mechanism's own
  delta is irrelevant once its history is known;
- a PRV failure falls back to RDP and is recorded (`method` says which one answered).

When a part has no guarantee the total is not a number:
- synthetic data from a generator trained WITHOUT DP: `not_covered` (no finite total);
- a generator record whose privacy unit differs from the run's (e.g. a per-patch generator
  under a per-patient classifier): `not_covered` (group privacy would be needed);
- a non-private classifier on real data: `inf`.

`served_epsilon(meta)` is what a served model answers: the total, or `not_covered`.
Pure functions over plain data: nothing here reads params.yaml, MLflow or files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mammodp.errors import PrivacyError

NOT_COVERED = "not_covered"
# Relative slack when re-deriving an engine's own epsilon from its summary (float rounding).
_CONSISTENCY_RTOL = 1e-6

History = list[tuple[float, float, int]]


def _num(value: Any) -> float:
    """A float from JSON-ish data where infinities may be the strings 'inf' / '-inf'."""
    if isinstance(value, str):
        return float(value)  # float('inf') parses
    return float(value)


def history_from_summary(summary: Mapping[str, Any]) -> History:
    """The accountant history of a `DPSGD.summary()` (constant sigma and q over its steps).

    The engine steps with one noise multiplier and one sample rate, so its history is one
    run `(sigma, q, steps)`. The epsilon this history gives under the summary's accountant
    must equal the summary's own epsilon; anything else means the engine changed (e.g. a
    schedule of sigmas) and the history has to come from `state_dict()` instead.

    Args:
        summary: `DPSGD.summary()` of a private run.

    Returns:
        `[(noise_multiplier, sample_rate, steps)]`, or `[]` before the first step.

    Raises:
        PrivacyError: the summary is not a private run's, or its epsilon does not follow
            from the reconstructed history.
    """
    if not summary.get("private", True) or summary.get("accountant", "none") == "none":
        raise PrivacyError("a non-private run has no accountant history", field="privacy")
    steps = int(summary["steps"])
    if steps == 0:
        return []
    from mammodp.privacy.accountant import make_accountant

    history = [(_num(summary["noise_multiplier"]), _num(summary["sample_rate"]), steps)]
    acc = make_accountant(summary["accountant"])
    acc.history = list(history)
    delta = _num(summary["delta"])
    again = acc.epsilon(delta)
    spent = _num(summary["epsilon"])
    if not math.isclose(again, spent, rel_tol=_CONSISTENCY_RTOL, abs_tol=1e-9):
        raise PrivacyError(
            f"the run's epsilon {spent:.6g} does not follow from (sigma={history[0][0]:.6g}, "
            f"q={history[0][1]:.6g}, steps={steps}) under {summary['accountant']} ({again:.6g}); "
            "its accountant history is needed to compose it", field="privacy")
    return history


@dataclass(frozen=True)
class Mechanism:
    """One DP mechanism over the private records: its history and what it claims alone.

    Attributes:
        name: `classifier` or `generator` (for messages).
        history: (noise multiplier, sample rate, steps) runs.
        privacy_unit: `patch` or `patient`.
        accountant: the mechanism its own epsilon was computed with (`prv`, `rdp`).
        epsilon: its own epsilon at `delta`.
        delta: the delta of its own epsilon.
    """

    name: str
    history: History
    privacy_unit: str
    accountant: str
    epsilon: float
    delta: float


def classifier_mechanism(summary: Mapping[str, Any]) -> Mechanism:
    """The classifier run's mechanism from its `DPSGD.summary()`."""
    return Mechanism("classifier", history_from_summary(summary), str(summary["privacy_unit"]),
                     str(summary["accountant"]), _num(summary["epsilon"]), _num(summary["delta"]))


def generator_mechanism(record: Mapping[str, Any]) -> Mechanism:
    """The generator's mechanism from the privacy record `train-gan` writes (`gan.json`
    `privacy`, copied to the synthetic set's `generator_privacy.json`).

    Raises:
        PrivacyError: the record is not a DP generator's or lacks its accountant history.
    """
    if not record.get("dp"):
        raise PrivacyError("the generator was not trained with DP: it has no accountant history",
                           field="gan.dp.enabled")
    state = record.get("accountant_state")
    if not isinstance(state, Mapping) or "history" not in state:
        raise PrivacyError("the generator's privacy record lacks its accountant history "
                           "(retrain it with `mammodp train-gan`)", field="gan.dp")
    history = [(_num(s), _num(q), int(n)) for s, q, n in state["history"]]
    return Mechanism("generator", history, str(record["privacy_unit"]), str(state.get("mechanism", "rdp")),
                     _num(record["epsilon"]), _num(record["delta"]))


def compose(histories: Sequence[History], delta: float, accountant: str = "rdp") -> tuple[float, str, str]:
    """Epsilon at `delta` of all `histories` run on the same records, by one accountant.

    Args:
        histories: accountant histories of the mechanisms (any mix of sigmas, rates, steps).
        delta: delta of the total.
        accountant: `rdp` or `prv` (PRV falls back to RDP if it fails).

    Returns:
        (epsilon, mechanism that answered, fallback reason or "").
    """
    from mammodp.privacy.accountant import PrivacyAccountant

    acc = PrivacyAccountant(accountant)
    acc.history = [tuple(h) for hist in histories for h in hist]  # type: ignore[misc]
    eps = acc.epsilon(delta)
    return float(eps), acc.mechanism, acc.fallback_reason or ""


@dataclass(frozen=True)
class EndToEnd:
    """A run's end-to-end guarantee.

    Attributes:
        epsilon_total: the composed epsilon at `delta`; inf for a non-private run; None when
            not covered.
        status: `covered`, `non_private` or `not_covered`.
        method: accountant that composed the total (`rdp`, `prv`), `none` otherwise.
        delta: delta of the total (the run's).
        parts: {name: own epsilon} of each mechanism.
        reason: why the total is not a finite number (empty when covered).
        fallback: PRV -> RDP fallback reason, if any.
    """

    epsilon_total: float | None
    status: str
    method: str
    delta: float
    parts: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    fallback: str = ""

    @property
    def text(self) -> str:
        """`epsilon_total` as a tag: a number (6 significant digits), `inf` or `not_covered`."""
        if self.epsilon_total is None:
            return NOT_COVERED
        return "inf" if math.isinf(self.epsilon_total) else f"{self.epsilon_total:.6g}"

    def within(self, budget: float) -> bool:
        """True when the end-to-end guarantee fits the budget (any run fits an inf budget)."""
        if math.isinf(budget):
            return True
        return self.status == "covered" and self.epsilon_total is not None and \
            self.epsilon_total <= budget * (1 + 1e-6)

    def statement(self) -> str:
        """One paragraph: what the total is, what it composes and what it does not cover."""
        if self.status == NOT_COVERED:
            return (f"epsilon_total = not_covered: {self.reason}. No finite epsilon covers this model's "
                    "training data end to end.")
        if self.status == "non_private":
            return f"epsilon_total = inf: {self.reason}."
        parts = " + ".join(f"{k} (own epsilon {v:.4g})" for k, v in self.parts.items()) or "no mechanism"
        how = (f"{self.method.upper()} composition over the union of the accountant histories"
               if len(self.parts) > 1 else f"{self.method.upper()} accountant")
        text = (f"epsilon_total = {self.text} at delta = {self.delta:g}: {parts}, by {how}, on the same "
                "private CBIS training records.")
        if self.fallback:
            text += f" Accountant fallback: {self.fallback}."
        return text


def end_to_end(
    classifier: Mapping[str, Any] | None,
    *,
    delta: float,
    privacy_unit: str,
    accountant: str,
    real_without_dp: bool = False,
    generator: Mapping[str, Any] | None = None,
    synthetic_used: bool = False,
) -> EndToEnd:
    """The end-to-end guarantee of a classifier run.

    Args:
        classifier: the run's `DPSGD.summary()`, or None when no private training record
            went through DP-SGD (synthetic-only training, or a non-private run).
        delta: the run's delta (the total is read here).
        privacy_unit: the run's privacy unit.
        accountant: the accountant that composes (`dp.accountant`; PRV falls back to RDP).
        real_without_dp: the run trained on real records without DP (epsilon = inf).
        generator: the synthetic set's generator privacy record (`generator_privacy.json`),
            None when there is none.
        synthetic_used: the run trained on synthetic data.

    Returns:
        The `EndToEnd` record.
    """
    if synthetic_used:
        if generator is None:
            return EndToEnd(None, NOT_COVERED, "none", delta,
                            reason="the synthetic set carries no generator privacy record")
        if not generator.get("dp"):
            return EndToEnd(None, NOT_COVERED, "none", delta,
                            reason="the synthetic data came from a generator trained on the private "
                                   "records WITHOUT DP")
        if not isinstance(generator.get("accountant_state"), Mapping):
            return EndToEnd(None, NOT_COVERED, "none", delta,
                            reason="the generator's privacy record lacks its accountant history (retrain it "
                                   "with `mammodp train-gan`)")
        if str(generator.get("privacy_unit")) != privacy_unit:
            return EndToEnd(None, NOT_COVERED, "none", delta,
                            reason=f"the generator's privacy unit ({generator.get('privacy_unit')}) differs "
                                   f"from this run's ({privacy_unit})")
    if real_without_dp:
        return EndToEnd(math.inf, "non_private", "none", delta,
                        reason="the classifier trained on the private records without DP")
    mechanisms: list[Mechanism] = []
    if classifier is not None:
        mechanisms.append(classifier_mechanism(classifier))
    if synthetic_used:
        mechanisms.append(generator_mechanism(generator))  # type: ignore[arg-type]
    parts = {m.name: m.epsilon for m in mechanisms}
    if not mechanisms:
        return EndToEnd(0.0, "covered", "none", delta, parts, reason="")
    if len(mechanisms) == 1 and mechanisms[0].name == "classifier" and mechanisms[0].delta == delta:
        # One mechanism: its own accountant's figure is the total (no second opinion).
        m = mechanisms[0]
        return EndToEnd(m.epsilon, "covered", m.accountant, delta, parts)
    eps, used, fallback = compose([m.history for m in mechanisms], delta, accountant)
    return EndToEnd(eps, "covered", used, delta, parts, fallback=fallback)


def served_epsilon(meta: Mapping[str, Any]) -> float | str:
    """The epsilon a served model answers: its end-to-end total, `inf`, or `not_covered`.

    Models saved before end-to-end accounting carry only their own `epsilon`: it is served
    only when they used no synthetic data (then it is the total); otherwise `not_covered`.
    """
    total = meta.get("epsilon_total")
    if total is not None:
        return total if isinstance(total, str) and total == NOT_COVERED else _num(total)
    if str(meta.get("synthetic_privacy", "none")) not in ("none", ""):
        return NOT_COVERED
    eps = meta.get("epsilon")
    return _num(eps) if eps is not None else "unknown"


__all__ = [
    "NOT_COVERED",
    "EndToEnd",
    "Mechanism",
    "classifier_mechanism",
    "compose",
    "end_to_end",
    "generator_mechanism",
    "history_from_summary",
    "served_epsilon",
]
