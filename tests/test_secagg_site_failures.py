"""Under secure aggregation, whether a site's training failed or diverged must not show:
a server could craft a global head that overflows only on examples with some property
and read, site by site, who refused. A site whose update is not finite (or whose training
failed) masks update 0 there, like any other reply, and stays in the sum."""

from __future__ import annotations

import types

import numpy as np
import pytest

from fedlora.app.client import client_app
from fedlora.app.client.secure_aggregation import zero_update
from fedlora.protocol import STATUS_KEY
from fedlora.runtime import parse_run_config
from fedlora.secure_sum import from_records

from .test_secagg_floor import RUN_CONFIG, Sites

COHORT = [7, 8, 9]
NO_PERSONAL = types.SimpleNamespace(personal_keys=lambda reply: set())


def _round(target_reply):
    """A round of three sites (each of 8 and 9 adds 0.1 to every entry); site 7 replies
    ``target_reply`` through the ClientApp's reply. Returns (replies of the masked input,
    the signed sum in the ring's levels)."""
    cfg = parse_run_config(RUN_CONFIG)

    def train(msg, context, respond):
        u = int(context.node_id)
        reply = target_reply if u == 7 else {"w": np.full(3, 0.1, np.float32)}
        return client_app._reply(msg, context, cfg, NO_PERSONAL, reply, {}, respond)

    sites = Sites(COHORT, train)
    messages = sites.messages_for("masked_input")
    masked = {u: sites.send("masked_input", u, body) for u, body in messages.items()}
    bodies = {u: from_records(r.content) for u, r in masked.items()
              if r.content[STATUS_KEY]["status"] == "ok"}
    messages = sites.server.collect_masked(bodies)
    replies = {u: from_records(sites.send("consistency", u, b).content)
               for u, b in messages.items()}
    messages = sites.server.collect_signatures(replies)
    replies = {u: from_records(sites.send("unmask", u, b).content)
               for u, b in messages.items()}
    return masked, sites.server.aggregate(replies)


@pytest.mark.parametrize("target_reply", [
    {"w": np.array([np.nan, np.inf, -np.inf], np.float32)},
    {"w": np.array([np.nan, np.nan, np.nan], np.float32)},
    zero_update(),
], ids=["diverged", "all-nan", "training-failed"])
def test_a_site_that_diverged_masks_update_zero_and_stays_in_the_sum(identity, target_reply,
                                                                     caplog):
    masked, total = _round(target_reply)
    status = masked[7].content[STATUS_KEY]
    assert status["status"] == "ok", status  # no refusal in the clear
    assert "masked" in from_records(masked[7].content)
    assert total.survivors == tuple(COHORT)
    np.testing.assert_array_equal(total.signed(), [2, 2, 2])  # 8 and 9; 7 adds 0


def test_a_partly_diverged_update_keeps_its_finite_entries(identity):
    _, total = _round({"w": np.array([np.nan, 0.1, 0.1], np.float32)})
    np.testing.assert_array_equal(total.signed(), [2, 3, 3])
