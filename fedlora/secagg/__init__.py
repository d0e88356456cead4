"""Secure aggregation for fedlora: SecAgg+ (Bell et al., CCS 2020) with the consistency
check of SecAgg (Bonawitz et al., CCS 2017), as a pure library without Flower.

The server learns the sum modulo 2^k of the clients' integer vectors, and nothing more
about any one vector, as long as it colludes with fewer than t of any client's neighbours
(the neighbour graph comes from a seed the clients draw together, which the server cannot
choose); a server that also shows clients different
survivor sets needs only c <= 2t - k colluding neighbours (k of them), so against such a
server the bound is that, not t. Clients may drop out at any stage; the sum then
covers those that sent their masked vector, provided each secret still has t share holders.

Layout:

* :mod:`~fedlora.secagg.crypto`: X25519, HKDF-SHA256, ChaCha20-Poly1305, Ed25519.
* :mod:`~fedlora.secagg.shamir`: t-of-n Shamir sharing of byte strings over GF(2^521 - 1).
* :mod:`~fedlora.secagg.masks`: vectors mod 2^k, the ChaCha20 mask generator, sizes and the
  signed encoding.
* :mod:`~fedlora.secagg.graph`: the SecAgg+ neighbour graph, its degree and threshold.
* :mod:`~fedlora.secagg.common`: the round config, errors and signed transcripts.
* :mod:`~fedlora.secagg.joint_seed`: the graph seed the clients draw together (commit,
  then reveal).
* :mod:`~fedlora.secagg.floor`: a client's own floor on the cohort and the threshold.
* :mod:`~fedlora.secagg.client`, :mod:`~fedlora.secagg.server`: the two sides of the
  protocol, over plain dict messages (the client module describes the stages).
* :mod:`~fedlora.secagg.local`: one round run in-process.
"""

from __future__ import annotations

from .client import SecAggClient
from .common import ProtocolError, RoundAborted, RoundConfig, SecAggError
from .graph import COMPLETE, check_parameters, choose_parameters, neighbour_graph
from .local import STAGES, run_local_round
from .masks import MAX_BITS, add, bits_for, decode, encode, modulus_bits, prg, subtract
from .server import Aggregate, SecAggServer
from .shamir import combine, split

__all__ = [
    "COMPLETE", "MAX_BITS", "STAGES", "Aggregate", "ProtocolError", "RoundAborted",
    "RoundConfig", "SecAggClient", "SecAggError", "SecAggServer", "add", "bits_for",
    "check_parameters", "choose_parameters", "combine", "decode", "encode", "modulus_bits",
    "neighbour_graph", "prg", "run_local_round", "split", "subtract",
]
