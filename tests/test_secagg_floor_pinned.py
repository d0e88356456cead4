"""A pinned site's floor counts only the sites it verified. The server names U2 and U3 and
could make up every site that is not the target's neighbour (no one checks their keys but
their own neighbours, which it also plays): counting names, a floor of 4 in a round of 8
sites of degree 2 is met by one real neighbour pair and five invented sites. A pinned
site counts its verified neighbours and itself, and refuses."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.secagg import ProtocolError, RoundAborted, RoundConfig, SecAggClient
from fedlora.secagg.floor import Floor
from fedlora.secagg.identity import generate, load_identity, load_peers
from fedlora.secagg.local import run_local_round


@pytest.fixture()
def pinned(tmp_path):
    cohort = list(range(1, 9))
    keys = {u: tmp_path / f"site-{u}.key" for u in cohort}
    peers = tmp_path / "peers.txt"
    peers.write_text("\n".join(generate(k) for k in keys.values()) + "\n")
    return cohort, keys, load_peers(peers)


def _clients(cohort, keys, trusted, floor):
    return {u: SecAggClient(u, identity=load_identity(keys[u]), trusted=trusted, floor=floor)
            for u in cohort}


def test_a_pinned_site_counts_only_the_sites_it_verified(pinned):
    cohort, keys, trusted = pinned
    config = RoundConfig.create(1, cohort, length=4, bits=16, degree=2, threshold=2)
    inputs = {u: np.arange(4) + u for u in cohort}
    refusals: dict = {}
    with pytest.raises(RoundAborted):  # 8 names in U2, but each site verified only 3
        run_local_round(config, inputs, clients=_clients(cohort, keys, trusted, Floor(4)),
                        refusals=refusals)
    assert refusals and all(isinstance(e, ProtocolError) and "verified here" in str(e)
                            for e in refusals.values()), refusals
    # A floor the neighbours meet lets the round through.
    config = RoundConfig.create(2, cohort, length=4, bits=16, degree=2, threshold=2)
    total = run_local_round(config, inputs, clients=_clients(cohort, keys, trusted, Floor(3)))
    assert np.array_equal(total.total, sum(inputs.values()) % 2**16)


def test_unpinned_sites_count_the_names_as_before():
    cohort = list(range(1, 9))
    config = RoundConfig.create(1, cohort, length=4, bits=16, degree=2, threshold=2)
    inputs = {u: np.arange(4) + u for u in cohort}
    clients = {u: SecAggClient(u, floor=Floor(4)) for u in cohort}
    total = run_local_round(config, inputs, clients=clients)
    assert total.survivors == tuple(cohort)
