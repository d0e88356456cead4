"""A client's own floor on the rounds it joins: the fewest clients a round may sum and the
fewest shares that may rebuild one of its secrets.

The server writes the round config, so a cohort of two or a threshold of one is its choice
unless each client holds a floor of its own. A client given a :class:`Floor` checks it
against what the round actually announces, at every stage where that can shrink:

* at setup, the config it is asked to sign: ``len(cohort) >= min_cohort`` and
  ``threshold >= min_threshold``;
* before it makes its keys, the set of clients that committed to the graph seed (those
  that can be in the round at all): ``len(S) >= min_cohort``;
* before masking, the set U2 of clients that shared their keys (the most that can end up
  in the sum): ``len(U2) >= min_cohort``, checked before the client masks (or trains), so
  that a round that fell below the floor never sees its masked input;
* before signing U3, the set of clients whose masked input arrived (those in the sum):
  ``len(U3) >= min_cohort``; the client then reveals no share.

A refusal is a :class:`~fedlora.secagg.common.ProtocolError` naming the floor and the
announced value. The counts are of the node ids the round names. Without pinned
identities that is all the floor guarantees: the server vouches for every site's keys, so
a server that invents clients can pad every count, and the floor then bounds only what an
honest server's round may be. With pinned identities (``trusted``,
:mod:`fedlora.secagg.identity`) a client also counts, in U2 and U3 and among the
signatures on U3, only the sites it verified: its neighbours whose keys a pinned identity
signed (and that signed U3), itself included. Sites elsewhere in the graph cannot be
verified, so a pinned client's floor is met only when enough of its own neighbours are in
the round (a floor above the graph's degree plus one is never met).
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import ProtocolError, RoundConfig

__all__ = ["Floor"]


@dataclass(frozen=True)
class Floor:
    """The least cohort (``min_cohort``, a count >= 2) and threshold (``min_threshold``, a
    count >= 1) a client accepts; the names of the settings they come from go into the
    refusals (``cohort_key``, ``threshold_key``)."""

    min_cohort: int = 2
    min_threshold: int = 1
    cohort_key: str = "min_cohort"
    threshold_key: str = "min_threshold"

    def __post_init__(self) -> None:
        for name, low in (("min_cohort", 2), ("min_threshold", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def check_config(self, config: RoundConfig) -> None:
        """``ProtocolError`` when the round config's cohort or threshold is below the floor."""
        self.check_cohort(len(config.cohort), "the round config's cohort")
        if config.threshold < self.min_threshold:
            raise ProtocolError(f"the round's threshold of {config.threshold} shares is below "
                                f"this site's {self.threshold_key} = {self.min_threshold}")

    def check_cohort(self, count: int, what: str) -> None:
        """``ProtocolError`` when ``count`` clients (``what``: which set) are below the floor."""
        if count < self.min_cohort:
            raise ProtocolError(f"{what} holds {count} sites, below this site's "
                                f"{self.cohort_key} = {self.min_cohort}")
