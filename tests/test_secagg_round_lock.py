"""A site's secure-round state against stage messages delivered at once: two copies of a
stage, or two stages together, run in two threads on one node's state; one goes through,
the other is refused as out of order, and the state is the one the first left."""

from __future__ import annotations

import threading
import time

import numpy as np
from flwr.app import Context, RecordDict

from fedlora.app.client import secure_aggregation as site
from fedlora.protocol import STATUS_KEY
from fedlora.runtime import parse_run_config
from fedlora.secagg.crypto import public_bytes
from fedlora.secagg.state import load_client, unflatten
from fedlora.secure_sum import from_records

from .test_secagg_floor import RUN_CONFIG, App, message, round_config

COHORT = [7, 8, 9]


class SlowState(RecordDict):
    """A node state that takes a while to read (a busy node): without a lock, the second of
    two messages delivered at once reads it before the first has written it back."""

    slow = False

    def get(self, key, default=None):
        value = super().get(key, default)
        if self.slow:
            time.sleep(0.2)
        return value


class Round:
    """Three sites' node states and the ClientApp's registered handlers."""

    def __init__(self, trained: list):
        self.states = {u: SlowState() for u in COHORT}
        self.app = App()
        cfg = parse_run_config(RUN_CONFIG)

        def train(msg, context, respond):
            trained.append(int(context.node_id))
            time.sleep(0.3)  # training takes a while: a second copy arrives meanwhile
            return respond(msg, context, cfg, {"w": np.full(3, 0.1, np.float32)})

        site.register(self.app, None, train)
        self.config = round_config(COHORT)

    def context(self, u):
        return Context(run_id=1, node_id=u, node_config={}, state=self.states[u],
                       run_config=RUN_CONFIG)

    def send(self, stage, u, body):
        return self.app.handlers[f"secagg_{stage}"](message(stage, u, body), self.context(u))

    def keys(self):
        return {u: from_records(self.send("setup", u, self.config.to_message()).content)
                for u in COHORT}

    def shares(self, keys):
        out = {}
        for u in COHORT:
            reply = self.send("share_keys", u, {"keys": {v: keys[v] for v in COHORT if v != u}})
            out[u] = from_records(reply.content)["ciphertexts"]
        return out


def at_once(*calls):
    """Run the calls in two threads released together; their results, in order."""
    barrier, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i, call):
        barrier.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def _statuses(replies):
    return sorted(r.content[STATUS_KEY]["status"] for r in replies)


def test_two_copies_of_share_keys_advance_the_state_once(identity):
    rnd = Round([])
    keys = rnd.keys()
    rnd.states[7].slow = True
    body = {"keys": {v: keys[v] for v in COHORT if v != 7}}
    replies = at_once(lambda: rnd.send("share_keys", 7, body),
                      lambda: rnd.send("share_keys", 7, body))
    assert _statuses(replies) == ["could-not-train", "ok"]
    refused = next(r for r in replies if r.content[STATUS_KEY]["status"] != "ok")
    assert "cannot run 'share_keys' now" in refused.content[STATUS_KEY]["reason"]
    state = dict(rnd.states[7][site.STATE_KEY])
    assert state["_stage"] == "masked_input"  # the first copy's state, not aborted


def test_two_copies_of_the_masked_input_train_once(identity):
    """The server sends the masked-input stage twice at once: the site trains once and
    sends one masked update (two would be masked alike, and spend the budget twice)."""
    trained: list = []
    rnd = Round(trained)
    shares = rnd.shares(rnd.keys())
    body = {"ciphertexts": {v: shares[v][7] for v in COHORT if v != 7}, "u2": COHORT}
    replies = at_once(lambda: rnd.send("masked_input", 7, body),
                      lambda: rnd.send("masked_input", 7, body))
    assert trained == [7]
    assert _statuses(replies) == ["could-not-train", "ok"]
    assert sum("secagg-masked" in r.content for r in replies) == 1
    assert dict(rnd.states[7][site.STATE_KEY])["_stage"] == "consistency"


def test_two_copies_of_setup_keep_the_first_ones_keys(identity):
    """Two setups at once: without the lock both would pass the once-per-round check and
    the second would replace the keys the first advertised."""
    rnd = Round([])
    rnd.states[7].slow = True
    replies = at_once(lambda: rnd.send("setup", 7, rnd.config.to_message()),
                      lambda: rnd.send("setup", 7, rnd.config.to_message()))
    assert _statuses(replies) == ["could-not-train", "ok"]
    sent = from_records(next(r for r in replies
                             if r.content[STATUS_KEY]["status"] == "ok").content)
    rnd.states[7].slow = False
    stored = load_client(unflatten(dict(rnd.states[7][site.STATE_KEY])))
    assert stored.stage == "share_keys"
    assert public_bytes(stored._c_sk) == sent["c_pk"]  # the keys the server was sent


def test_a_stage_out_of_order_is_refused_and_changes_nothing(identity):
    rnd = Round([])
    rnd.keys()
    before = dict(rnd.states[7][site.STATE_KEY])
    reply = rnd.send("consistency", 7, {"u3": COHORT})
    assert "cannot run 'consistency' now" in reply.content[STATUS_KEY]["reason"]
    assert dict(rnd.states[7][site.STATE_KEY]) == before

