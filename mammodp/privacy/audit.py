"""Empirical privacy audit: membership inference and a one-run epsilon lower bound.

A DP guarantee is an upper bound proved on paper; an audit attacks the trained model and
turns the attack's success into a LOWER bound that holds with high confidence. A lower bound
above the claimed epsilon means a bug in the engine or the accounting.

One-run audit (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023): m canaries are each included in the training set independently with
probability 1/2; after training the auditor scores every canary, guesses "included" for the
k best-scoring ones and abstains on the rest. Under (epsilon, delta)-DP the number of correct
guesses v among r guesses is stochastically dominated (up to a delta term) by
Binomial(r, e^eps / (1 + e^eps)); `one_run_p_value` is that tail probability with the
paper's delta correction, and `one_run_epsilon` the largest epsilon it rejects at the given
significance. Trying several k costs a Bonferroni correction (`one_run_audit`).

Membership inference (members vs non-members of one model's training set):
- loss attack: score = minus the loss of the true label (Yeom et al. 2018);
- LiRA-style likelihood ratio (Carlini et al., "Membership Inference Attacks From First
  Principles", 2022) with few shadow models: per example, Gaussians fitted to the shadows'
  logit-scaled confidences when the example was in / out of their training sets, with one
  pooled ("fixed") variance per side as the paper recommends for few shadows; an example with
  no in- (out-) shadow borrows the mean in/out gap of the others;
- reported as attack AUROC and TPR at a low FPR (the largest TPR at FPR <= the target on
  the empirical ROC; with n non-members FPRs below 1/n are read at FPR 0).

Canaries, two kinds, trained in the same run:
- input-space (black-box): `make_canaries` draws out-of-distribution patches (uniform noise)
  with random labels, which a model can only fit by memorising them one by one; scored by the
  loss attack. Weak with few canaries (a model's guess on an unseen noise patch is often
  confidently right by chance);
- gradient (white-box) "Dirac" canaries, as in Steinke et al.'s white-box audit:
  `DiracCanaryModel` adds one coordinate w_j per canary to the classifier; canary j is a
  constant patch (no real patch is constant) whose only gradient is along w_j, so once
  clipped it contributes exactly C along its own axis whenever it is sampled; the score is
  w_j after training. It tests precisely what DP-SGD promises (clipping, noise, sampling,
  accounting), and a non-private run separates in and out canaries perfectly (an out
  canary's coordinate never receives a gradient), which gives the audit its power.

Functions over arrays (numpy / scipy / scikit-learn); `DiracCanaryModel` is a torch module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import optimize, special, stats

from mammodp.errors import PrivacyError

# Default guess sizes as fractions of the canaries: k = m/32 ... m/2 (Bonferroni over these).
GUESS_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
_EPS_MAX = 100.0  # an epsilon lower bound beyond this is reported as this (no finite DP claim is near)


# --------------------------------------------------------------------------- one-run bound


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP with m canaries.

    Steinke et al. (2023): with q = e^eps / (1 + e^eps),
    beta = P[Binomial(r, q) >= v] and
    alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i, the p-value is
    min(1, beta + 2 m delta alpha).

    Args:
        m: canaries (each included with probability 1/2).
        r: guesses made (abstentions excluded), 0 <= r <= m.
        v: correct guesses, 0 <= v <= r.
        epsilon: the claim's epsilon (>= 0).
        delta: the claim's delta (in [0, 1]).
    """
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise PrivacyError(f"need 0 <= v <= r <= m, epsilon >= 0, delta in [0, 1]; got m={m}, r={r}, v={v}, "
                           f"epsilon={epsilon}, delta={delta}", field="audit")
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[B >= v]
    if delta == 0 or v == 0:
        return min(1.0, beta)
    i = np.arange(1, v + 1)
    tails = stats.binom.sf(v - i - 1, r, q) - beta  # P[v - i <= B < v]
    alpha = float(np.max(tails / i))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def one_run_epsilon(m: int, r: int, v: int, significance: float, delta: float) -> float:
    """The largest epsilon whose (epsilon, delta) claim `v` correct of `r` guesses rejects.

    Returns 0 when even epsilon = 0 is not rejected at `significance`.
    """
    if not 0 < significance < 1:
        raise PrivacyError(f"significance must be in (0, 1), got {significance}", field="audit.significance")

    def excess(eps: float) -> float:  # > 0 while the claim is rejected
        return significance - one_run_p_value(m, r, v, eps, delta)

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        if hi >= _EPS_MAX:
            return _EPS_MAX
        hi *= 2.0
    return float(optimize.brentq(excess, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-7))


@dataclass(frozen=True)
class OneRunResult:
    """A one-run audit's outcome.

    Attributes:
        epsilon: the empirical lower bound (0 = nothing rejected).
        m: canaries; included: how many were in the training set.
        guesses: r of the best hypothesis; correct: v.
        hypotheses: guess sizes tried (the Bonferroni factor).
        significance: per-audit significance (before Bonferroni); delta: the claim's delta.
    """

    epsilon: float
    m: int
    included: int
    guesses: int
    correct: int
    hypotheses: int
    significance: float
    delta: float


def one_run_audit(scores: Sequence[float], included: Sequence[bool], *, significance: float, delta: float,
                  guess_fractions: Sequence[float] = GUESS_FRACTIONS) -> OneRunResult:
    """Empirical epsilon lower bound from one training run's canary scores.

    Guesses "included" for the k highest-scoring canaries, for each k = max(1, round(f m)) of
    `guess_fractions`, and reports the best bound at significance / (number of k tried).

    Args:
        scores: (m,) attack score per canary (higher = more likely included).
        included: (m,) whether each canary was in the training set (the coin flips).
        significance: e.g. 0.05 for 95% confidence.
        delta: the run's delta.
        guess_fractions: guess sizes as fractions of m.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1 or s.size == 0:
        raise PrivacyError("scores and included must be 1-D arrays of the same, non-zero length", field="audit")
    m = int(s.size)
    order = np.argsort(-s, kind="stable")
    ks = sorted({min(m, max(1, int(round(f * m)))) for f in guess_fractions})
    alpha = significance / len(ks)
    best = (0.0, ks[0], int(inc[order[: ks[0]]].sum()))
    for k in ks:
        v = int(inc[order[:k]].sum())
        eps = one_run_epsilon(m, k, v, alpha, delta)
        if eps > best[0]:
            best = (eps, k, v)
    return OneRunResult(epsilon=best[0], m=m, included=int(inc.sum()), guesses=best[1], correct=best[2],
                        hypotheses=len(ks), significance=significance, delta=delta)


# --------------------------------------------------------------------------- membership inference


def true_label_probability(p_malignant: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """P(true label) per sample from P(malignant), clipped away from 0 and 1."""
    p = np.asarray(p_malignant, dtype=np.float64)
    y = np.asarray(labels)
    return np.clip(np.where(y == 1, p, 1.0 - p), eps, 1.0 - eps)


def loss_scores(p_malignant: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Loss-attack score: minus the cross-entropy of the true label (higher = member)."""
    return np.log(true_label_probability(p_malignant, labels))


def logit_confidence(p_malignant: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's statistic: log(p / (1 - p)) of the true label's probability (near-Gaussian)."""
    p = true_label_probability(p_malignant, labels)
    return np.log(p) - np.log1p(-p)


def lira_scores(target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray) -> np.ndarray:
    """Likelihood-ratio membership scores from shadow models (fixed-variance LiRA).

    Args:
        target: (n,) the attacked model's `logit_confidence` per example.
        shadow: (K, n) the shadow models' `logit_confidence` on the same examples.
        shadow_in: (K, n) whether each example was in each shadow's training set.

    Returns:
        (n,) log N(target; mu_in, s_in) - log N(target; mu_out, s_out) (higher = member).
    """
    t = np.asarray(target, dtype=np.float64)
    sh = np.asarray(shadow, dtype=np.float64)
    ins = np.asarray(shadow_in, dtype=bool)
    if sh.ndim != 2 or sh.shape != ins.shape or sh.shape[1] != t.shape[0] or sh.shape[0] < 1:
        raise PrivacyError("shadow scores must be (K >= 1, n) like shadow_in, n = len(target)", field="audit")
    n_in, n_out = ins.sum(0), (~ins).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(n_in > 0, (sh * ins).sum(0) / n_in, np.nan)
        mu_out = np.where(n_out > 0, (sh * ~ins).sum(0) / n_out, np.nan)
    both = ~np.isnan(mu_in) & ~np.isnan(mu_out)
    if both.any():
        gap = float(np.mean(mu_in[both] - mu_out[both]))
    else:  # e.g. one shadow: the in/out gap from all examples (inclusion is random, so unbiased)
        gap = float(sh[ins].mean() - sh[~ins].mean()) if ins.any() and (~ins).any() else 0.0
    mu_in = np.where(np.isnan(mu_in), mu_out + gap, mu_in)
    mu_out = np.where(np.isnan(mu_out), mu_in - gap, mu_out)

    def pooled(mask: np.ndarray, mu: np.ndarray) -> float:
        dev = (sh - mu[None, :])[mask]
        counts = mask.sum(0)
        dof = int(mask.sum() - (counts > 0).sum())  # one mean fitted per example
        if dof > 0:
            return max(float(np.sqrt((dev ** 2).sum() / dof)), 1e-3)
        return max(float(np.std(sh[mask])) if mask.any() else 1.0, 1e-3)  # too few shadows: global spread

    s_in, s_out = pooled(ins, mu_in), pooled(~ins, mu_out)
    return stats.norm.logpdf(t, mu_in, s_in) - stats.norm.logpdf(t, mu_out, s_out)


@dataclass(frozen=True)
class AttackResult:
    """Membership-inference figures of one attack on one model.

    Attributes:
        auroc: attack AUROC (0.5 = chance).
        tpr_at_fpr: {fpr: TPR at FPR <= fpr}.
        members, non_members: how many examples of each were scored.
    """

    auroc: float
    tpr_at_fpr: dict[float, float]
    members: int
    non_members: int


def attack_metrics(scores: np.ndarray, is_member: np.ndarray, fprs: Sequence[float] = (0.001, 0.01)) -> AttackResult:
    """AUROC and TPR at low FPR of membership scores (higher = member)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_member, dtype=bool)
    if y.all() or not y.any():
        raise PrivacyError("membership inference needs both members and non-members", field="audit")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    out = {float(f): float(tpr[fpr <= f + 1e-12].max()) for f in fprs}
    return AttackResult(float(roc_auc_score(y, s)), out, int(y.sum()), int((~y).sum()))


# --------------------------------------------------------------------------- canaries


def make_canaries(m: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """m out-of-distribution canaries: uniform-noise patches (m, 1, size, size) in [0, 1] and
    balanced random labels (m,), from `seed` (the audit's design is public)."""
    if m < 2:
        raise PrivacyError(f"need at least 2 canaries, got {m}", field="audit.canaries")
    rng = np.random.default_rng(seed)
    images = rng.random((m, 1, size, size), dtype=np.float32)
    labels = rng.permutation(np.arange(m) % 2).astype(np.int64)
    return images, labels


def dirac_canary_images(m: int, size: int) -> np.ndarray:
    """(m, 1, size, size) constant patches: canary j has value (j + 1) / (m + 1) everywhere
    (flip-invariant, and never a real patch: validation rejects patches without spread)."""
    values = (np.arange(m, dtype=np.float32) + 1.0) / (m + 1.0)
    return np.broadcast_to(values[:, None, None, None], (m, 1, size, size)).copy()


class DiracCanaryModel(torch.nn.Module):
    """A classifier plus one private coordinate per gradient canary.

    Real patches go through the classifier unchanged. A constant patch with value
    (j + 1) / (m + 1) is gradient canary j: its logits are [0, scale * w_j], so its loss
    depends on w_j alone and its (clipped) gradient points along w_j; the classifier's own
    output for it is discarded (and computed on a fixed ramp so nothing degenerates).
    Parameters are the classifier's plus `canary.weight` (1, m), initialised to 0.

    Args:
        classifier: the model being audited (any module mapping (B, C, H, W) to (B, 2)).
        n_canaries: m.
        scale: logit per unit of w_j (with Adam, w_j moves about lr per step: scale ~ 1 /
            (lr x steps) keeps the canary's gradient above C, i.e. clipped, for the whole run).
    """

    def __init__(self, classifier: torch.nn.Module, n_canaries: int, scale: float):
        super().__init__()
        self.classifier = classifier
        self.canary = torch.nn.Linear(n_canaries, 1, bias=False)
        torch.nn.init.zeros_(self.canary.weight)
        self.n_canaries = int(n_canaries)
        self.scale = float(scale)
        # The hook-based per-sample gradients cover Linear layers: keep the classifier's route.
        self.dp_sample_major = bool(getattr(classifier, "dp_sample_major", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) patches in [0, 1] -> logits (B, 2)."""
        flat = x.flatten(1)
        is_canary = (flat.amax(1) - flat.amin(1)) == 0  # (B,) constant patch
        j = torch.round(flat[:, 0] * (self.n_canaries + 1)) - 1  # (B,) canary index (float)
        slots = torch.arange(self.n_canaries, device=x.device, dtype=x.dtype)
        onehot = ((j[:, None] == slots[None, :]) & is_canary[:, None]).to(x.dtype)  # (B, m)
        ramp = torch.linspace(0.0, 1.0, x.shape[-1], device=x.device, dtype=x.dtype)
        safe = torch.where(is_canary[:, None, None, None], ramp.expand_as(x), x)
        logits = self.classifier(safe).float()
        # "+ 0 x logits" adds nothing but puts the canary layer downstream of the classifier's
        # layers, so the hook-based per-sample gradients (one backward along one chain) reach it.
        z = self.canary(onehot + 0.0 * logits[:, :1].to(x.dtype))[:, 0] * self.scale  # (B,)
        canary_logits = torch.stack([torch.zeros_like(z), z], dim=1).to(logits.dtype)
        return torch.where(is_canary[:, None], canary_logits, logits)

    def canary_scores(self) -> np.ndarray:
        """(m,) w_j after training: the white-box score of each canary."""
        return self.canary.weight.detach().cpu().double().numpy()[0]


def coin_flips(n: int, seed: int) -> np.ndarray:
    """Independent inclusion coins with probability 1/2 (True = in the training set)."""
    return np.random.default_rng(seed).random(n) < 0.5


__all__ = [
    "GUESS_FRACTIONS",
    "AttackResult",
    "DiracCanaryModel",
    "dirac_canary_images",
    "OneRunResult",
    "attack_metrics",
    "coin_flips",
    "lira_scores",
    "logit_confidence",
    "loss_scores",
    "make_canaries",
    "one_run_audit",
    "one_run_epsilon",
    "one_run_p_value",
    "true_label_probability",
]
