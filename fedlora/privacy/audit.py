"""Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski, 2023).

The auditor makes ``m`` canary examples and puts each one in the training data
independently with probability 1/2. After training it guesses, from what was released,
for some canaries whether they were in (+1) or out (-1) and abstains on the rest. If the
training is (epsilon, delta)-DP with respect to adding or removing one example, the number
``W`` of correct guesses among ``r`` guesses satisfies (the paper's main theorem)::

    P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, p) >= v],   p = e^epsilon / (1 + e^epsilon).

With ``delta = 0`` this is the pure-DP statement: the guesses are no better than ``r``
independent coin flips that land right with probability ``p``. A run where ``v`` correct
guesses would have probability at most ``1 - confidence`` refutes epsilon; the largest
epsilon refuted (with every smaller one) is a lower bound on the true epsilon that holds
with that confidence (:func:`epsilon_lower_bound`). Choosing among several guess sizes
after seeing the scores costs a union (Bonferroni) bound (:func:`audit_guesses`).

:func:`canary_scores` is the white-box scoring used by ``simulations.audit_privacy``:
which canaries the released update is made of, by least squares over the per-example
gradients at the starting point. Everything here is NumPy: arrays in, numbers out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AuditOutcome", "audit_guesses", "canary_fit", "canary_scores", "count_correct",
           "epsilon_lower_bound", "guess", "max_lower_bound", "p_value", "presence_llr"]

#: Largest epsilon the search tries; a bound this large means "as large as we can tell".
EPSILON_CAP = 100.0


@functools.lru_cache(maxsize=64)
def _log_choose(n: int) -> np.ndarray:
    """``log C(n, k)`` for k = 0..n."""
    lg = np.array([math.lgamma(j + 1.0) for j in range(n + 1)])
    return lg[n] - lg - lg[::-1]


def _binom_pmf(n: int, log_p: float, log_q: float) -> np.ndarray:
    """``P[Binomial(n, p) = k]`` for k = 0..n, given ``log p`` and ``log q = log(1 - p)``."""
    k = np.arange(n + 1, dtype=np.float64)
    return np.exp(_log_choose(n) + k * log_p + (n - k) * log_q)


def _check_counts(num_guesses: int, num_correct: int) -> tuple[int, int]:
    r, v = int(num_guesses), int(num_correct)
    if r != num_guesses or v != num_correct or not 0 <= v <= r:
        raise ValueError(f"need integers 0 <= num_correct <= num_guesses, got "
                         f"{num_correct!r} of {num_guesses!r}")
    return r, v


def p_value(num_guesses: int, num_correct: int, *, epsilon: float, delta: float,
            num_canaries: int) -> float:
    """The largest probability that an (epsilon, delta)-DP training lets ``num_correct`` or
    more of ``num_guesses`` guesses be right (the theorem above), capped at 1."""
    r, v = _check_counts(num_guesses, num_correct)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite float >= 0, got {epsilon!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if num_canaries < r:
        raise ValueError(f"num_canaries ({num_canaries}) < num_guesses ({r})")
    if v == 0:
        return 1.0
    log_p, log_q = -math.log1p(math.exp(-epsilon)), -math.log1p(math.exp(epsilon))
    pmf = _binom_pmf(r, log_p, log_q)  # P[B = k], k = 0..r
    tail = float(pmf[v:].sum())  # f(v)
    if delta > 0:
        below = np.cumsum(pmf[v - 1 :: -1])  # [i - 1]: P[v - i <= B < v], i = 1..v
        tail += 2 * num_canaries * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail)


def epsilon_lower_bound(num_guesses: int, num_correct: int, *, num_canaries: int,
                        delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon such that ``num_correct`` right of ``num_guesses`` guesses is
    rejected at ``confidence`` for it and for every smaller epsilon (0.0 when even
    epsilon = 0 is not rejected): with probability at least ``confidence`` the training's
    true epsilon (at this delta) is at least this."""
    r, v = _check_counts(num_guesses, num_correct)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return p_value(r, v, epsilon=eps, delta=delta, num_canaries=num_canaries) <= alpha

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # the tail grows to 1 with epsilon: a finite crossing exists
        lo, hi = hi, 2 * hi
        if hi > EPSILON_CAP:
            return EPSILON_CAP
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    # The delta term need not be monotone in epsilon: keep only what is rejected all the way.
    for eps in np.arange(0.0, lo, 0.01):
        if not rejected(float(eps)):
            return max(0.0, float(eps) - 0.01)
    return lo


def max_lower_bound(num_guesses: int, *, num_canaries: int, delta: float,
                    confidence: float = 0.95) -> float:
    """The bound if every one of ``num_guesses`` guesses were right: the most any run with
    this many guesses can show (a claim above it cannot be refuted by such an audit)."""
    return epsilon_lower_bound(num_guesses, num_guesses, num_canaries=num_canaries,
                               delta=delta, confidence=confidence)


def guess(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """Guesses from membership scores (higher: more likely in): +1 for the ``k_pos``
    highest, -1 for the ``k_neg`` lowest, 0 (abstain) for the rest. Ties are broken by
    position, which carries no information when inclusion is independent of position."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a 1-D array of finite numbers")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > len(s):
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= {len(s)}, got "
                         f"{k_pos}, {k_neg}")
    order = np.argsort(-s, kind="stable")
    out = np.zeros(len(s), dtype=np.int64)
    out[order[:k_pos]] = 1
    if k_neg:
        out[order[len(s) - k_neg :]] = -1
    return out


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """``(guesses made, guesses right)`` against the true inclusion (bool per canary)."""
    g = np.asarray(guesses)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    if g.shape != truth.shape:
        raise ValueError(f"guesses {g.shape} and inclusion {truth.shape} differ in shape")
    made = g != 0
    return int(made.sum()), int((g[made] == truth[made]).sum())


@dataclass(frozen=True)
class AuditOutcome:
    """The best of the pre-chosen guess sizes, with its Bonferroni-corrected bound."""

    epsilon_lower_bound: float
    k_pos: int
    k_neg: int
    num_guesses: int
    num_correct: int
    confidence: float  # the overall confidence (each size was tested at 1 - (1 - c) / sizes)
    tested: tuple[tuple[int, int, int, int, float], ...]  # (k_pos, k_neg, r, v, bound) each
    ceiling: float  # the bound if all guesses of the largest size were right


def audit_guesses(scores: np.ndarray, included: np.ndarray, *,
                  sizes: Sequence[tuple[int, int]], delta: float,
                  confidence: float = 0.95) -> AuditOutcome:
    """Guess with every ``(k_pos, k_neg)`` in ``sizes`` (fixed before looking at the
    scores), bound epsilon for each at ``1 - (1 - confidence) / len(sizes)``, and keep
    the largest: a union bound makes it hold with probability ``confidence``."""
    if not sizes:
        raise ValueError("need at least one guess size")
    m = len(np.asarray(scores))
    each = 1.0 - (1.0 - confidence) / len(sizes)
    tested = []
    for k_pos, k_neg in sizes:
        r, v = count_correct(guess(scores, k_pos, k_neg), included)
        tested.append((k_pos, k_neg, r, v, epsilon_lower_bound(
            r, v, num_canaries=m, delta=delta, confidence=each)))
    best = max(tested, key=lambda t: (t[4], -t[2]))
    widest = max(k_pos + k_neg for k_pos, k_neg in sizes)
    return AuditOutcome(epsilon_lower_bound=best[4], k_pos=best[0], k_neg=best[1],
                        num_guesses=best[2], num_correct=best[3], confidence=confidence,
                        tested=tuple(tested),
                        ceiling=max_lower_bound(widest, num_canaries=m, delta=delta,
                                                confidence=each))


def canary_scores(update: np.ndarray, gradients: np.ndarray, num_canaries: int, *,
                  ridge: float = 1e-4, pool_others: bool = False) -> np.ndarray:
    """How strongly each canary is in a released update: a z-score per canary.

    ``update``: (d,) the released adapter minus the adapter training started from.
    ``gradients``: (n, d) per-example loss gradients at that starting adapter, of every
    example the auditor knows might be in the training data, the ``num_canaries``
    canaries last. To first order, gradient descent moves the adapter by minus a
    non-negative combination of the gradients of the examples it trained on, plus the
    mechanism's noise. Rows are scaled to unit norm (clipping changes only lengths) and
    ``-update`` is regressed on them by ridge least squares (``ridge`` relative to the unit
    diagonal); each canary's coefficient is divided by its standard error under white
    noise, so that a canary whose gradient is nearly a mix of the others' does not stand
    out by chance. Larger: more likely in.

    ``pool_others``: the examples before the canaries are known to be in with the same
    weight (full-batch steps, every one of them in every step): one column, their unit
    gradients summed, stands for all of them, which leaves the canaries' coefficients less
    entangled with theirs (smaller standard errors).
    """
    coef, se = canary_fit(update, gradients, num_canaries, ridge=ridge,
                          pool_others=pool_others, noise_std=1.0)
    return coef / se


def canary_fit(update: np.ndarray, gradients: np.ndarray, num_canaries: int, *,
               ridge: float = 1e-4, pool_others: bool = False,
               noise_std: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares fit of :func:`canary_scores`: each canary's coefficient and its
    standard error, for white noise of ``noise_std`` per entry (None: estimated from what
    the fit leaves unexplained, the noise in the ``d - n`` directions no gradient spans)."""
    u = np.asarray(update, dtype=np.float64).ravel()
    x = np.asarray(gradients, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != u.size:
        raise ValueError(f"gradients must be (n, {u.size}), got {x.shape}")
    if not 0 < num_canaries <= x.shape[0]:
        raise ValueError(f"num_canaries must be in [1, {x.shape[0]}], got {num_canaries}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)  # a zero gradient stays zero (and scores 0)
    if pool_others and len(x) > num_canaries:
        others = x[: len(x) - num_canaries].sum(axis=0, keepdims=True)
        x = np.concatenate([others / max(np.linalg.norm(others), 1e-30),
                            x[len(x) - num_canaries :]])
    gram = x @ x.T + ridge * np.eye(len(x))  # (n, n)
    inv = np.linalg.inv(gram)
    coef = inv @ (x @ -u)  # (n,)
    if noise_std is None:
        free = max(u.size - len(x), 1)
        noise_std = float(np.linalg.norm(-u - coef @ x)) / np.sqrt(free)
    tail = slice(len(x) - num_canaries, len(x))
    return coef[tail], noise_std * np.sqrt(np.diag(inv)[tail])


def presence_llr(z: np.ndarray, *, signal: np.ndarray, steps: int,
                 sample_rate: float) -> np.ndarray:
    """Log-likelihood ratio "in" against "out" of each canary's z-score in one round of
    ``steps`` Poisson-sampled steps at ``sample_rate``: in, it was drawn ``k ~ Binomial(steps,
    sample_rate)`` times and ``z ~ N(k * signal, 1)``; out, ``z ~ N(0, 1)``. Summed over
    rounds it is the most powerful score for the linear model (few steps a round make each
    draw of a canary visible on its own, which a plain sum of z-scores averages away)."""
    z = np.asarray(z, dtype=np.float64)
    a = np.asarray(signal, dtype=np.float64)
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}")
    k = np.arange(steps + 1, dtype=np.float64)
    log_pmf = (_log_choose(steps) + k * math.log(sample_rate)
               + (steps - k) * (math.log1p(-sample_rate) if sample_rate < 1 else 0.0))
    if sample_rate == 1:
        log_pmf = np.where(k == steps, 0.0, -np.inf)
    terms = log_pmf + np.multiply.outer(a * z, k) - np.multiply.outer(a ** 2 / 2, k ** 2)
    top = terms.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(terms - top).sum(axis=-1, keepdims=True)))[..., 0]
