"""Per-process state shared by the ServerApp and ClientApp: parsed configs, encoded data.

Everything here is cached per process: a simulation worker that serves many virtual
clients parses the run-config, tokenises the data and loads the base model once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import adapter_families, aggregation, base_quant, config, privacy, secure_sum
from .data import CausalLMDataset, EncodedDataset, TextDataset, train_val_split
from .models import LoraSpec, choose_num_threads, forget_cached_models, load_tokenizer
from .tasks import TASKS, client_source, get_task, load_task_data
from .tasks import registry as task_registry

if TYPE_CHECKING:
    from .run_config import RunConfig

__all__ = ["resolve_config", "model_spec", "server_spec", "method_for", "encode", "encoded_test_set", "ClientData",
           "client_data", "set_threads_once", "forget_process_state"]

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # share of a client's examples kept for federated evaluation


def resolve_config(run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None):
    """Parse and validate Flower's run-config (cached on its contents)."""
    items = tuple(sorted({**dict(run_config), **dict(overrides or {})}.items()))
    return _resolve(items)


def parse_run_config(run_config: Mapping[str, Any] | None = None,
                     overrides: Mapping[str, Any] | None = None, **known: Any):
    """:func:`fedlora.config.parse_run_config` with the DP mechanisms' recipes and checks,
    secure aggregation's and the adapter family's (``known``: the tasks and aggregators to check against, none
    unless given)."""
    cfg = config.parse_run_config(run_config, overrides, dp=privacy, **known)
    secure_sum.check_config(cfg)
    adapter_families.check_config(cfg, aggregation.METHODS)
    base_quant.check_config(cfg)
    return cfg


@functools.lru_cache(maxsize=16)
def _resolve(items: tuple[tuple[str, Any], ...]):
    return parse_run_config(dict(items), known_tasks=TASKS,
                            known_aggregators=aggregation.METHODS)


def model_spec(cfg: RunConfig, rank: int | None = None) -> LoraSpec:
    """The adapter layout of a run (``rank`` overrides ``lora-rank``, e.g. for one site)."""
    task = get_task(cfg.task)
    return LoraSpec.from_config(
        cfg, model_path=task.model_path(cfg), num_labels=len(task.label_names(cfg)), rank=rank,
        freeze_a=aggregation.METHODS[cfg.aggregator].freeze_a, causal_lm=task.causal_lm,
    )


def server_spec(cfg: RunConfig) -> LoraSpec:
    """The server's model: the run's layout on the unquantised base (``base-quant`` is a
    site's memory saving; the global adapter is evaluated and exported on the full base)."""
    return dataclasses.replace(model_spec(cfg), base_quant="none")


def method_for(cfg: RunConfig) -> aggregation.Method:
    """The federated method (protocol around the aggregator) a run-config asks for."""
    return aggregation.get_method(cfg.aggregator, alpha=cfg.lora_alpha, rank=cfg.lora_rank,
                                  error_feedback=cfg.svd_error_feedback)


_THREADS_SET = False


def set_threads_once(requested: int) -> int:
    """Set torch's intra-op threads once per process (see :func:`choose_num_threads`)."""
    global _THREADS_SET
    n = choose_num_threads(requested)
    if not _THREADS_SET:
        torch.set_num_threads(n)
        _THREADS_SET = True
    return torch.get_num_threads()


def encode(cfg: RunConfig, data: TextDataset) -> EncodedDataset:
    """``data`` tokenised for the task's model: labelled texts for a classifier, or
    next-token targets for a causal language model."""
    task = get_task(cfg.task)
    tok = load_tokenizer(task.model_path(cfg))
    kind = CausalLMDataset if task.causal_lm else EncodedDataset
    return kind(data, tok, cfg.max_length)


@functools.lru_cache(maxsize=4)
def encoded_test_set(cfg: RunConfig) -> EncodedDataset | None:
    """The task's centralised test set, tokenised (None if the task has none); a seeded
    sample of ``max-test-examples`` of it when that is set and smaller."""
    test = load_task_data(cfg).test
    if test is None or len(test) == 0:
        return None
    if 0 < cfg.max_test_examples < len(test):
        keep = np.random.default_rng(cfg.seed).choice(len(test), cfg.max_test_examples,
                                                      replace=False)
        test = test.subset(np.sort(keep))
    return encode(cfg, test)


class ClientData:
    """One client's examples, tokenised, with its local train/validation split.

    Without ``hold_out`` (under DP, where sites do not evaluate) every example trains: a
    seeded split would move other rows between train and validation when one row is added,
    so neighbouring datasets would train on sets differing by more than that row.
    """

    def __init__(self, data: EncodedDataset, indices: np.ndarray, seed: int, *,
                 hold_out: bool = True) -> None:
        self.data = data
        if not hold_out:
            self.train_idx, self.val_idx = np.asarray(indices), np.asarray(indices[:0])
            return
        tr, va = train_val_split(len(indices), VAL_FRACTION, seed)
        self.train_idx = indices[tr]
        self.val_idx = indices[va]

    @property
    def num_train(self) -> int:
        return len(self.train_idx)


# (cfg, id(rows)) -> (rows, tokenised rows); holding ``rows`` keeps its id from being reused.
_ENCODED: dict[tuple[Any, int], tuple[Any, EncodedDataset]] = {}


def _encoded(cfg: RunConfig, rows) -> EncodedDataset:
    """``rows`` tokenised once per process (the simulation pool, or a site's own file)."""
    key = (cfg, id(rows))
    hit = _ENCODED.get(key)
    if hit is None or hit[0] is not rows:
        while len(_ENCODED) >= 8:
            _ENCODED.pop(next(iter(_ENCODED)))
        hit = _ENCODED[key] = (rows, encode(cfg, rows))
    return hit[1]


def client_data(
    cfg: RunConfig, *, partition_id: int | None, num_partitions: int | None, data_path: str | None
) -> ClientData:
    """The data of one client, from where :func:`fedlora.tasks.client_source` says."""
    rows, indices = client_source(cfg, partition_id=partition_id,
                                  num_partitions=num_partitions, data_path=data_path)
    return ClientData(_encoded(cfg, rows), indices, cfg.seed + int(partition_id or 0),
                      hold_out=cfg.dp_mode == "off")


def forget_process_state() -> None:
    """Drop what this process keeps for the runs it served: parsed run-configs, tokenised
    data, a site's rows and partitions, models, and the torch thread setting. A worker
    process kept to serve another run then starts it as a fresh process would (the
    packaged datasets' rows, read-only and the same for every run, stay)."""
    global _THREADS_SET
    _resolve.cache_clear()
    encoded_test_set.cache_clear()
    _ENCODED.clear()
    task_registry.forget_cached_data()
    forget_cached_models()
    _THREADS_SET = False
