"""Workloads: which pretrained model, which data, which labels.

Every model and every dataset comes from an installed package or a local path;
nothing is fetched from a network hub. Tasks are registered by name; the run-config
key ``task`` picks one.

The registry and the API shared by all tasks live in :mod:`.registry`; each task has
its own module (:mod:`.rotten_tomatoes`, :mod:`.news`, :mod:`.shakespeare`,
:mod:`.custom`), which registers it when imported below.
"""

from __future__ import annotations

# The task modules register themselves on import, in this order.
from . import custom, news, rotten_tomatoes, shakespeare  # noqa: E402,F401,I001
from .news import news_labels  # noqa: E402
from .registry import (
                       TASKS,
                       Task,
                       TaskData,
                       client_dataset,
                       client_source,
                       get_task,
                       load_task_data,
                       minilm_path,
                       partition_indices,
                       register_task,
)
from .rotten_tomatoes import RT_LABELS  # noqa: E402
from .shakespeare import LLAMA_TARGETS, parse_play, smollm2_path  # noqa: E402

__all__ = ["LLAMA_TARGETS", "RT_LABELS", "TASKS", "Task", "TaskData", "client_dataset",
           "client_source", "get_task", "load_task_data", "minilm_path", "news_labels",
           "parse_play", "partition_indices", "register_task", "smollm2_path"]
