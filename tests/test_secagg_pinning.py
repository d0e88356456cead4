"""A deployed site that relies on secure aggregation pins identities: with only the
server's word for its neighbours' keys, the server alone could swap every neighbour's key
bundle for one of its own, decrypt the site's shares and unmask its update. Such a site
refuses a secure round without node-config ``secagg-identity`` and ``secagg-peers``;
a simulated site keeps running unpinned."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from fedlora.app.client.secure_aggregation import stage_fn
from fedlora.privacy.site_policy import PolicyRefusal, SitePolicy
from fedlora.protocol import STATUS_KEY
from fedlora.runtime import parse_run_config
from fedlora.secagg.identity import generate

from .test_secagg_floor import RUN_CONFIG, message, round_config

RELYING = [{"require-secure-aggregation": True}, {"secagg-min-cohort": 3},
           {"secagg-min-threshold": 2}, {"accept-dp-modes": "distributed,sample"}]


def _setup(node_config):
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                  run_config=RUN_CONFIG)
    reply = stage_fn("setup", message("setup", 7, round_config([7, 8, 9]).to_message()), ctx)
    return reply.content[STATUS_KEY]


@pytest.mark.parametrize("policy", RELYING)
def test_a_deployed_site_relying_on_the_sum_refuses_an_unpinned_round(identity, policy):
    status = _setup(policy)
    assert status["status"] == "could-not-train"
    assert "'secagg-identity' and 'secagg-peers'" in status["reason"], dict(status)
    with pytest.raises(PolicyRefusal, match="'secagg-peers'"):
        SitePolicy.from_node_config({**policy, "secagg-identity": "/k"}).check_pinned()


def test_a_pinned_deployed_site_and_a_simulated_one_take_part(identity, tmp_path):
    key, peers = tmp_path / "site.key", tmp_path / "peers.txt"
    peers.write_text(generate(key) + "\n")
    pinned = {"secagg-min-cohort": 3, "secagg-identity": str(key), "secagg-peers": str(peers)}
    assert _setup(pinned)["status"] == "ok"
    assert _setup({"secagg-min-cohort": 3, "partition-id": 0})["status"] == "ok"


def test_the_training_check_refuses_an_unpinned_secure_run_naming_the_keys():
    cfg = parse_run_config(RUN_CONFIG)
    policy = SitePolicy.from_node_config({"accept-dp-modes": "off",
                                          "require-secure-aggregation": "true"})
    with pytest.raises(PolicyRefusal, match="'secagg-identity' and 'secagg-peers'"):
        policy.check_run(cfg)
