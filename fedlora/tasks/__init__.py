"""Workloads: which pretrained model, which data, which labels.

Every model and every dataset comes from an installed package or a local path;
nothing is fetched from a network hub. Tasks are registered by name; the run-config
key ``task`` picks one.

The registry and the API shared by all tasks live in :mod:`.registry`; each task has
its own module (:mod:`.rotten_tomatoes`, :mod:`.news`, :mod:`.shakespeare`,
:mod:`.custom`), which registers it when imported below.
"""

from __future__ import annotations

from .registry import (TASKS, Task, TaskData, _package_dir, _partitions, client_dataset,
                       client_source,
                       get_task, load_task_data, log, minilm_path, partition_indices,
                       register_task)

__all__ = ["Task", "TASKS", "get_task", "register_task", "TaskData", "client_dataset",
           "client_source",
           "partition_indices", "load_task_data"]

# The task modules register themselves on import, in this order.
from . import rotten_tomatoes, news, shakespeare, custom  # noqa: E402,F401
from .rotten_tomatoes import RT_LABELS, _rotten_tomatoes_rows  # noqa: E402,F401
from .news import _bbc_news_rows, news_labels  # noqa: E402,F401
from .shakespeare import (LLAMA_TARGETS, SHAKESPEARE_LINES_PER_SAMPLE,  # noqa: E402,F401
                          SHAKESPEARE_MIN_LINES, SHAKESPEARE_TEST_EXAMPLES, SMOLLM2_CACHE_NAME,
                          SMOLLM2_GGUF, _shakespeare_rows, parse_play, smollm2_path)
