"""What secure aggregation costs per round: bytes per site and protocol seconds, for 4, 20
and 100 sites, against sending the adapter in the clear.

    python -m simulations.bench_secure_aggregation                 # 4, 20, 100 sites
    python -m simulations.bench_secure_aggregation --sites 4,20 --length 74498
    python -m simulations.bench_secure_aggregation --wire int8     # on the int8 wire

One SecAgg+ round of :mod:`fedlora.secagg` in this process (every site and the server as
objects, each message encoded as the Flower records :mod:`fedlora.secure_sum` sends and
counted as :func:`fedlora.secure_sum.protocol_bytes` counts it, and checked against the
formulas of :mod:`fedlora.secagg_bytes`), over vectors of
``--length`` coordinates (default: the default task's LoRA adapter, 74,498 entries) at the
run-config's default quantisation (``secagg-levels``), or on the integer wire of
``--wire int8``/``int4`` (127 or 7 levels). Printed per cohort size: bytes a site sends and
receives in the round's six stages, against the adapter on the same wire, one array, each
way (the plain round); the site's protocol seconds (mean over sites: key agreement, sharing,
masking, signing, unmasking) and the server's (checks, reconstruction, unmasking), against
nothing for a plain round. Training time is the same with and without, so it is left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flwr.app import RecordDict  # noqa: E402

from fedlora.quantization import QMAX  # noqa: E402
from fedlora.run_config import KEYS_BY_NAME  # noqa: E402
from fedlora.secagg import RoundConfig, SecAggClient, SecAggServer, bits_for  # noqa: E402
from fedlora.secagg_bytes import round_bytes  # noqa: E402
from fedlora.secure_sum import protocol_bytes, to_records  # noqa: E402
from fedlora.wire import encoded_bytes  # noqa: E402

ADAPTER_ENTRIES = 74_498  # the default task's LoRA adapter (rank 8 on query and value, head)
STAGES = ("setup", "advertise", "share_keys", "masked_input", "consistency", "unmask")


def _size(body, bits: int) -> int:
    return protocol_bytes(RecordDict(to_records(body, bits)))


def one_round(sites: int, length: int, levels: int, wire: str = "float32") -> dict:
    """One round of ``sites`` sites over random inputs; bytes and seconds per party."""
    cohort = tuple(range(1, sites + 1))
    config = RoundConfig.create(1, cohort, length=length,
                                bits=bits_for(sites, levels, signed=True))
    rng = np.random.default_rng(0)  # the inputs only: the protocol draws from OS entropy
    mod = np.uint64(1) << np.uint64(config.bits)
    inputs = {u: rng.integers(0, int(mod), length, dtype=np.uint64) for u in cohort}
    clients = {u: SecAggClient(u) for u in cohort}
    server = SecAggServer(config)
    up, down = defaultdict(int), defaultdict(int)
    site_seconds, server_seconds = defaultdict(float), 0.0
    collect = (server.collect_commitments, server.collect_keys, server.collect_shares,
               server.collect_masked, server.collect_signatures, server.aggregate)
    t = time.perf_counter()
    messages = server.setup()
    server_seconds += time.perf_counter() - t
    result = None
    for stage, gather in zip(STAGES, collect):
        replies = {}
        for u, msg in messages.items():
            down[u] += _size(msg, config.bits)
            t = time.perf_counter()
            if stage == "masked_input":
                reply = clients[u].masked_input(msg, inputs[u])
            else:
                reply = getattr(clients[u], stage)(msg)
            site_seconds[u] += time.perf_counter() - t
            up[u] += _size(reply, config.bits)
            replies[u] = reply
        t = time.perf_counter()
        messages = gather(replies)
        server_seconds += time.perf_counter() - t
        result = messages
    expected = np.zeros(length, dtype=np.uint64)
    for vector in inputs.values():
        expected = (expected + vector) & (mod - np.uint64(1))
    assert np.array_equal(np.asarray(result.total, dtype=np.uint64), expected), "sum differs"
    formula = round_bytes(sites, config.degree, length, config.bits)
    for direction, seen in (("up", up), ("down", down)):
        predicted = sum(stage[direction] for stage in formula.values())
        assert set(seen.values()) == {predicted}, f"{direction}: measured != analytic"
    return {"sites": sites, "degree": config.degree, "threshold": config.threshold,
            "bits": config.bits, "up": np.mean(list(up.values())),
            "down": np.mean(list(down.values())), "plain": encoded_bytes(length, wire),
            "site_seconds": np.mean(list(site_seconds.values())),
            "server_seconds": server_seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", default="4,20,100")
    ap.add_argument("--length", type=int, default=ADAPTER_ENTRIES)
    ap.add_argument("--levels", type=int, default=KEYS_BY_NAME["secagg-levels"].default)
    ap.add_argument("--wire", default="float32", choices=("float32", "int8", "int4"),
                    help="int8/int4: the wire's integer range sets the levels (127, 7)")
    args = ap.parse_args(argv)
    levels = QMAX.get(args.wire, args.levels)
    print("| sites | neighbours | threshold | modulus bits | bytes up per site (x the plain "
          "adapter) | protocol bytes down per site (the adapter on top) | site protocol s | "
          "server protocol s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sites.split(",") if s):
        r = one_round(n, args.length, levels, args.wire)
        print(f"| {n} | {r['degree']} | {r['threshold']} | {r['bits']} | "
              f"{r['up']:,.0f} ({r['up'] / r['plain']:.2f}x) | "
              f"{r['down']:,.0f} | "
              f"{r['site_seconds']:.2f} | {r['server_seconds']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
