"""Rounds in which no reply was accepted: say why in one line, and stop a run going nowhere.

A round whose every sampled reply was refused or dropped leaves the global adapter where
it was, yet under a DP mode each site that trained spent its budget on it. The server
logs one line naming the commonest reason and what to change, writes it into the round's
row (``note``, shown in the report), and after ``stop-after-empty-rounds`` such rounds in a
row stops the run with that line as its error.

Under ``dp-mode = "client"`` the replies' fates are withheld from everything the server
publishes (:class:`fedlora.app.server.run_record.RunRecord`), so nothing is said or stopped there.
"""

from __future__ import annotations

import re
from collections import Counter

from .round_outcome import RoundOutcome

__all__ = ["EmptyRounds", "RunGoingNowhere", "diagnose"]

#: (text found in a reason, what to change); the first match wins.
_HINTS = (
    ("honest private reply", "the replies changed the adapter more than an honest private "
                             "reply can: look for clients sending poisoned updates"),
    ("max-update-norm", "the replies are longer than the server's bound: raise max-update-norm "
                        "(0 turns the bound off) or look for a client sending a poisoned update"),
    ("budget", "the sites' privacy budget is spent: a site's max-epsilon caps every run it "
               "joins; start fewer rounds or ask the sites for a larger budget"),
    ("secure aggregation released nothing", "too few sites finished the secure "
     "aggregation round: sample more sites (fraction-train) or lower secagg-threshold"),
    ("refuses", "the sites' own policy (their node-config) refuses this run: meet it (the "
                "reason names the key) or ask the sites to accept it"),
    ("process died", "the clients' processes died: lower max-physical-batch-size or "
                     "batch-size, or give each client more memory (client-resources-num-cpus)"),
    ("round-timeout", "no reply came in time: raise round-timeout (0 waits for every reply)"),
    ("Node Unavailable", "the sites went offline: check the SuperNodes and their connection"),
)


class RunGoingNowhere(RuntimeError):
    """Raised when ``stop-after-empty-rounds`` rounds in a row accepted no reply."""


def _kind(reason: str) -> str:
    """A reason with its numbers masked: replies refused for one cause count together."""
    return re.sub(r"\d[\w.+-]*", "#", reason)


def diagnose(server_round: int, outcome: RoundOutcome) -> str | None:
    """The one-line why of a round that accepted no reply (None if it accepted any, or
    sampled no one)."""
    if outcome.accepted or not outcome.sampled:
        return None
    reasons = [r for _, r in outcome.refused] + [r for _, r in outcome.dropped]
    if not reasons:
        return None
    kinds = Counter(_kind(r) for r in reasons)
    kind, times = kinds.most_common(1)[0]
    common = next(r for r in reasons if _kind(r) == kind)  # its first instance, as written
    hint = next((h for marker, h in _HINTS if marker in common),
                "see the per-reply reasons in the log and in metrics.json")
    return (f"round {server_round}: no reply was accepted ({len(outcome.refused)} refused, "
            f"{len(outcome.dropped)} dropped); commonest reason ({times}x): {common}. "
            f"What to change: {hint}.")


class EmptyRounds:
    """Counts rounds in a row that accepted no reply; :meth:`check` raises at the limit."""

    def __init__(self, limit: int, enabled: bool = True) -> None:
        self.limit = int(limit)
        self.enabled = enabled
        self.in_a_row = 0

    def observe(self, server_round: int, outcome: RoundOutcome) -> str | None:
        """The round's one-line note (None for a round that accepted a reply)."""
        if not self.enabled:
            return None
        note = diagnose(server_round, outcome)
        self.in_a_row = self.in_a_row + 1 if note else 0
        return note

    def check(self, note: str | None) -> None:
        """Stop the run when the limit of empty rounds in a row is reached."""
        if note and self.limit and self.in_a_row >= self.limit:
            raise RunGoingNowhere(
                f"stopping after {self.in_a_row} rounds in a row with no accepted reply "
                f"(stop-after-empty-rounds = {self.limit}); the last: {note}")
