"""A site's secure-round state against stage messages delivered at once: two copies of a
stage run in two threads, on one node state or each on its own copy of it (as Flower hands
each message to a process of its own); one goes through, the other is refused as out of
order, and the state is the one the first left."""

from __future__ import annotations

import threading
import time

import numpy as np
from flwr.app import RecordDict

from fedlora.app.client import secure_aggregation as site
from fedlora.protocol import STATUS_KEY
from fedlora.runtime import parse_run_config
from fedlora.secagg import joint_seed
from fedlora.secagg.state import load_client, unflatten
from fedlora.secure_sum import from_records

from .test_secagg_floor import RUN_CONFIG, Sites

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


def sites(trained: list) -> Sites:
    """Three sites whose training takes a while (a second copy arrives meanwhile)."""
    cfg = parse_run_config(RUN_CONFIG)

    def train(msg, context, respond):
        trained.append(int(context.node_id))
        time.sleep(0.3)
        return respond(msg, context, cfg, {"w": np.full(3, 0.1, np.float32)})

    return Sites(COHORT, train, state=SlowState)


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
    rnd = sites([])
    body = rnd.messages_for("share_keys")[7]
    rnd.states[7].slow = True
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
    rnd = sites(trained)
    body = rnd.messages_for("masked_input")[7]
    replies = at_once(lambda: rnd.send("masked_input", 7, body),
                      lambda: rnd.send("masked_input", 7, body))
    assert trained == [7]
    assert _statuses(replies) == ["could-not-train", "ok"]
    assert sum("secagg-masked" in r.content for r in replies) == 1
    assert dict(rnd.states[7][site.STATE_KEY])["_stage"] == "consistency"


def test_two_copies_of_setup_keep_the_first_ones_commitment(identity):
    """Two setups at once: without the lock both would pass the once-per-round check and
    the second would replace the commitment the first sent."""
    rnd = sites([])
    rnd.states[7].slow = True
    replies = at_once(lambda: rnd.send("setup", 7, rnd.config.to_message()),
                      lambda: rnd.send("setup", 7, rnd.config.to_message()))
    assert _statuses(replies) == ["could-not-train", "ok"]
    sent = from_records(next(r for r in replies
                             if r.content[STATUS_KEY]["status"] == "ok").content)
    rnd.states[7].slow = False
    stored = load_client(unflatten(dict(rnd.states[7][site.STATE_KEY])))
    assert stored.stage == "advertise"
    assert joint_seed.commitment(rnd.config, 7, stored._seed_share) == sent["commitment"]


def test_a_stage_out_of_order_is_refused_and_changes_nothing(identity):
    rnd = sites([])
    rnd.messages_for("share_keys")
    before = dict(rnd.states[7][site.STATE_KEY])
    reply = rnd.send("consistency", 7, {"u3": COHORT})
    assert "cannot run 'consistency' now" in reply.content[STATUS_KEY]["reason"]
    assert dict(rnd.states[7][site.STATE_KEY]) == before


def _copy(state):
    """The node state as Flower hands it to one message: a copy."""
    return RecordDict(dict(state.items()))


def test_two_copies_of_share_keys_each_on_its_own_state_share_once(identity):
    """Each copy reads a state at the share-keys stage (no lock orders two processes):
    the stage record lets one through."""
    rnd = sites([])
    body = rnd.messages_for("share_keys")[7]
    first, second = _copy(rnd.states[7]), _copy(rnd.states[7])
    replies = at_once(lambda: rnd.send("share_keys", 7, body, state=first),
                      lambda: rnd.send("share_keys", 7, body, state=second))
    assert _statuses(replies) == ["could-not-train", "ok"]
    refused = next(r for r in replies if r.content[STATUS_KEY]["status"] != "ok")
    assert "cannot take stage 'share_keys'" in refused.content[STATUS_KEY]["reason"]
    assert sum("ciphertexts@dict" in r.content["secagg"] for r in replies
               if "secagg" in r.content) == 1


def test_two_copies_of_the_masked_input_each_on_its_own_state_train_once(identity):
    trained: list = []
    rnd = sites(trained)
    body = rnd.messages_for("masked_input")[7]
    first, second = _copy(rnd.states[7]), _copy(rnd.states[7])
    replies = at_once(lambda: rnd.send("masked_input", 7, body, state=first),
                      lambda: rnd.send("masked_input", 7, body, state=second))
    assert trained == [7]
    assert sum("secagg-masked" in r.content for r in replies) == 1


def test_a_stage_taken_on_another_copy_of_the_state_is_not_taken_again(identity):
    """The node took the stage on one copy of its state; Flower kept the other (the older
    one, say): the same stage sent again is refused by the stage record."""
    rnd = sites([])
    body = rnd.messages_for("share_keys")[7]
    ahead = _copy(rnd.states[7])
    assert rnd.send("share_keys", 7, body, state=ahead).content[STATUS_KEY]["status"] == "ok"
    again = rnd.send("share_keys", 7, body)  # the node's own state, still before the stage
    assert "cannot take stage 'share_keys'" in again.content[STATUS_KEY]["reason"]
