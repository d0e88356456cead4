"""A site's number of training examples under DP: released once, noised, and accounted.

Under ``dp-mode = sample`` the neighbouring relation adds or removes one example, so the
exact count ``n`` is private: a server that knew the other ``n - 1`` examples would read
membership straight off it. Yet DP-SGD needs a count: the Poisson rate ``q = B / n``,
the denominator of a full-batch (linear-probe) step and the weight of the site's reply in
the server's mean. (DP-SGD divides by the batch size B, a full-batch step by the count
but at least :data:`MIN_DENOMINATOR`, so a count drawn far too low cannot blow up a step.)
So a site releases its count once per run, with Gaussian noise of std
:data:`COUNT_NOISE_STD` (sensitivity 1, noise drawn from OS entropy), keeps the noised
value in its privacy ledger for every later round, and charges the release to that ledger;
each client's noise multiplier is calibrated with that charge included, so the run still
ends within its target epsilon. Everything the count sets (``q``, the step's denominator,
the weight) is post-processing of the noised count.

Under ``dp-mode = update`` the relation is any change of the site's data, whole dataset
included: no count is released at all, and every site's reply weighs the same.
"""

from __future__ import annotations

from ..entropy import private_numpy_rng

__all__ = ["COUNT_NOISE_STD", "MIN_DENOMINATOR", "UNWEIGHTED", "count_history",
           "full_batch_denominator", "noised_count"]

#: Std of the Gaussian noise on a site's released example count. It costs little budget
#: (Renyi DP a / (2 * 50^2) at order a; on the default task sigma is unchanged at epsilon 8
#: and 1 and 1.2% larger at 0.5) and moves a 500-example site's q by about 10%.
COUNT_NOISE_STD = 50.0
#: The weight every reply carries when no count is released (``update``).
UNWEIGHTED = 1
#: The smallest denominator of a full-batch private step: a count drawn far below the true
#: one must not multiply the step (and the reply's change) by n / count.
MIN_DENOMINATOR = int(2 * COUNT_NOISE_STD)


def full_batch_denominator(count: int) -> int:
    """What a full-batch (q = 1) private step divides its noised gradient sum by."""
    return max(int(count), MIN_DENOMINATOR)


def noised_count(true_count: int, noise_std: float = COUNT_NOISE_STD) -> int:
    """``max(1, round(n + N(0, noise_std^2)))``, the noise from OS entropy (a site with no
    usable example releases a count too: whether it has any is private as well)."""
    if true_count < 0:
        raise ValueError(f"an example count cannot be negative, got {true_count}")
    return max(1, int(round(true_count + private_numpy_rng().normal(0.0, noise_std))))


def count_history(noise_std: float, releases: int = 1) -> list[tuple[float, float, int]]:
    """The releases as accounting history: Gaussian steps at rate 1, noise multiplier
    ``noise_std`` (the sensitivity is 1)."""
    return [(float(noise_std), 1.0, int(releases))] if noise_std > 0 and releases > 0 else []
