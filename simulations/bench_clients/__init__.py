"""Client-updates per second and peak memory of many virtual clients: fedlora's ClientApp
against the rebuild-per-message pattern of Flower's examples.

    python -m simulations.bench_clients                   # N = 10, 100, 1000; DP-SGD on
    python -m simulations.bench_clients --dp both         # DP-SGD and non-private
    python -m simulations.bench_clients --quick           # smoke run: N = 4, 2 timed updates
    python -m simulations.bench_clients --patterns fedlora-bf16,rebuild-bf16  # equal precision

Two ClientApps run through the same Flower simulation engine with the same ServerApp
(fedlora's, so the same sampling, reply checks and aggregation) and the same run-config:

* ``fedlora``: :mod:`fedlora.app.client.client_app`. A simulation worker process loads the frozen base
  model, the tokenizer and the tokenised data once and serves every virtual client it is
  given from them; only the adapter tensors (and a DP client's privacy ledger in
  ``context.state``) belong to one client.
* ``rebuild``: :func:`.rebuild.build_rebuild_app`, the pattern of Flower's examples. On every
  train message it re-instantiates the pretrained model from its folder, wraps it in a new
  peft LoRA adapter of the same spec, loads the received adapter, loads the tokenizer,
  tokenises its partition, builds a DataLoader and (with DP) a new Opacus
  ``PrivacyEngine`` + ``make_private``, trains, and replies in fedlora's wire format.

Each ClientApp runs as a pattern: ``fedlora`` and ``rebuild`` with the base model in float32
(the baseline is the plain ``rebuild``, as in Flower's examples), and ``fedlora-bf16`` and
``rebuild-bf16`` with run-config ``base-dtype = "bfloat16"``: the frozen base weights in
bfloat16, the adapter, its (per-example) gradients and the optimiser in float32. The default
runs fedlora, fedlora-bf16 and rebuild; the ratios compare each fedlora pattern with the
baseline, and fedlora-bf16 with rebuild-bf16 when both ran.

Same per-client work for all: every round samples the same number of nodes
(``--per-round``; ``fraction-train`` = k / N and ``min-train-nodes`` = k), each trains
``local-steps`` steps of ``batch-size`` examples with the same ``dp-mode``, and virtual node
i trains on partition ``i mod --partitions`` of an iid split of the task's pool (equal
partitions), so a client's data neither differs between clients nor shrinks as N grows.
The strategy samples the same nodes for both patterns (its generator is seeded).
``fraction-evaluate`` is 0; the server's centralised test set is kept small
(``test-fraction`` 0.01).

What is timed: the wall time of the ServerApp's training exchange of each round
(``Grid.send_and_receive`` of the train messages: messages out, the ClientApps' work in the
simulation's workers, replies back). Round 1 is a warm-up (worker processes start, import
torch and fill their caches) and is not counted; central evaluation and checkpoint writing
happen outside the exchange and are never counted. updates/s = accepted replies of rounds
2..R / summed exchange time of those rounds. The all-rounds figure is reported too.

Peak memory: every configuration runs in a fresh process; a thread of this process samples,
every ``--sample-interval`` seconds, the resident set sizes (RSS) of that process (the
ServerApp and Flower's simulation engine) and of all its descendants (Ray's processes and
the worker processes that run the ClientApps) and keeps the peak of their sum. RSS counts
shared pages (e.g. torch's libraries) once per process; the figure compares like with like.

On a GPU (``--gpus-per-client``, Flower's fractional ``client-resources-num-gpus``) the
clients run with ``device = "cuda"``, and a thread of this process reads ``nvidia-smi``
every sample: the GPUs' mean utilisation during the timed training exchanges and their peak
memory are reported.

Results: a table and ratios on stdout; JSON and CSV under ``results/bench-clients/``.

Modules: :mod:`.configs` (patterns and run-configs), :mod:`.rebuild` (the baseline ClientApp),
:mod:`.timed_run` (one configuration in its own process), :mod:`.sampling` (memory and GPU
readings from outside), :mod:`.summary` (updates/s and the table) and :mod:`.cli` (the
command).
"""

from __future__ import annotations

from .cli import main
from .configs import bench_overrides
from .rebuild import build_rebuild_app, rebuild_train
from .timed_run import run_one

__all__ = ["bench_overrides", "build_rebuild_app", "main", "rebuild_train", "run_one"]
